"""Numerical parity: PyTorch reference (random weights) -> converter -> Flax model, float32 on CPU.

Every check asserts max|flax - torch| <= 1e-4 * max|torch| and prints the achieved ratio (run
with -s to see it). Classifier logits at 224 for all eight variants (two in the default run, the
others marked slow); backbone maps at two non-square sizes that need padding for one v1 and one
++ configuration with reduced depths.
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from crossformer_jax.convert import convert_torch_state_dict  # noqa: E402
from crossformer_jax.crossformer import VARIANTS, create_model, group_layout  # noqa: E402
from crossformer_jax.torch_reference import create_torch_model, randomize_parameters  # noqa: E402

TOLERANCE = 1e-4
BATCH = 2


def build_pair(name, *, features_only=False, seed=0, **overrides):
    """(torch model with random parameters, flax model, converted flax variables)."""
    torch_model = create_torch_model(name, features_only=features_only, **overrides)
    randomize_parameters(torch_model, seed).eval()
    variables = convert_torch_state_dict(
        torch_model.state_dict(), name, features_only=features_only, **overrides
    )
    flax_model = create_model(name, features_only=features_only, **overrides)
    return torch_model, flax_model, variables


def run_both(torch_model, flax_model, variables, height, width, seed):
    """Outputs on the same distinct random images, both as lists of NCHW (or (N, K)) arrays."""
    images = np.random.default_rng(seed).standard_normal((BATCH, 3, height, width))
    images = images.astype(np.float32)
    with torch.no_grad():
        reference = torch_model(torch.from_numpy(images))
    outputs = jax.jit(flax_model.apply)(variables, images.transpose(0, 2, 3, 1))
    if isinstance(reference, torch.Tensor):
        return [reference.numpy()], [np.asarray(outputs)]
    return (
        [r.numpy() for r in reference],
        [np.asarray(o).transpose(0, 3, 1, 2) for o in outputs],
    )  # NHWC -> NCHW


def check_close(label, references, outputs):
    ratios = []
    for i, (ref, out) in enumerate(zip(references, outputs)):
        assert ref.shape == out.shape, (label, i, ref.shape, out.shape)
        assert np.all(np.isfinite(out)), (label, i)
        # Distinct inputs give distinct outputs: the batch is not mixed up or broadcast.
        assert np.max(np.abs(ref[0] - ref[1])) > 1e-2 * np.max(np.abs(ref))
        ratio = float(np.max(np.abs(ref - out)) / np.max(np.abs(ref)))
        ratios.append(ratio)
        print(f'[parity] {label} output {i} {ref.shape}: max|diff|/max|ref| = {ratio:.2e}')
        assert ratio <= TOLERANCE, (label, i, ratio)
    assert len(references) == len(outputs)
    return ratios


# -------------------------------------------------------------------------------------------------
# Classifier logits at 224, every variant.

FAST_VARIANTS = ('crossformer_tiny', 'crossformer_pp_small')


@pytest.mark.parametrize(
    'name', [n if n in FAST_VARIANTS else pytest.param(n, marks=pytest.mark.slow) for n in VARIANTS]
)
def test_classifier_logits_at_224(name, record_property):
    torch_model, flax_model, variables = build_pair(name, seed=1)
    references, outputs = run_both(torch_model, flax_model, variables, 224, 224, seed=2)
    ratios = check_close(f'{name} logits 224', references, outputs)
    record_property('parity_ratio', max(ratios))


# -------------------------------------------------------------------------------------------------
# Backbone maps at non-square sizes needing padding, reduced depths.

SIZES = ((256, 320), (384, 224))
BACKBONES = {
    # v1 widths/heads/groups of crossformer_tiny, two blocks (SDA + LDA) per stage.
    'v1': ('crossformer_tiny', dict(depths=(2, 2, 2, 2))),
    # ++ widths/heads/groups of crossformer_pp_small; stage 2 of depth 4 has an ACL after block 2.
    'pp': ('crossformer_pp_small', dict(depths=(2, 2, 4, 2))),
}


def rules_exercised(name, overrides, sizes):
    """Which grouping rules the blocks of this configuration meet at these input sizes."""
    config = {**VARIANTS[name], **overrides}
    seen = set()
    for height, width in sizes:
        for s, depth in enumerate(config['depths']):
            h, w = height // 2 ** (s + 2), width // 2 ** (s + 2)
            g = config['group_size'][s]
            for j in range(depth):
                lda = j % 2 == 1
                layout = group_layout(
                    h,
                    w,
                    group_size=g,
                    interval=config['interval'][s],
                    long_distance=lda,
                    version=config['version'],
                )
                padded = layout.padded != (h, w)
                if min(h, w) <= g:
                    seen.add('small map rule' + (' with padding' if padded else ''))
                else:
                    seen.add(f'{"LDA" if lda else "SDA"} stage {s}')
                    if padded:
                        seen.add(f'{"LDA" if lda else "SDA"} with padding')
                if layout.group[0] != layout.group[1]:
                    seen.add('non-square group')
                if config['version'] == 'pp' and (j + 1) % 3 == 0 and j < depth - 1:
                    seen.add('ACL')
    return seen


def test_backbone_rules_are_covered():
    v1 = rules_exercised(*BACKBONES['v1'], SIZES)
    pp = rules_exercised(*BACKBONES['pp'], SIZES)
    for seen in (v1, pp):
        assert {'SDA with padding', 'small map rule with padding'} <= seen
        assert {f'SDA stage {s}' for s in range(3)} <= seen and {
            f'LDA stage {s}' for s in range(3)
        } <= seen
    # v1 LDA keeps the interval and grows the group (non-square at non-square sizes, never padded
    # for multiples of 32); ++ LDA tiles fixed G*I regions, with padding.
    assert 'non-square group' in v1
    assert {'LDA with padding', 'ACL'} <= pp


@pytest.mark.parametrize('version', sorted(BACKBONES))
def test_backbone_maps_non_square(version, record_property):
    name, overrides = BACKBONES[version]
    torch_model, flax_model, variables = build_pair(name, features_only=True, seed=3, **overrides)
    ratios = []
    # One model, both sizes in turn: nothing about the first input may be remembered.
    for k, (height, width) in enumerate(SIZES):
        references, outputs = run_both(
            torch_model, flax_model, variables, height, width, seed=4 + k
        )
        expected_shapes = [
            (BATCH, 64 * 2**s, height // 2 ** (s + 2), width // 2 ** (s + 2)) for s in range(4)
        ]
        assert [r.shape for r in references] == expected_shapes
        ratios += check_close(f'{version} backbone {height}x{width}', references, outputs)
    record_property('parity_ratio', max(ratios))
