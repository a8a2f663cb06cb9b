"""Numerical parity: PyTorch reference (random weights) -> converter -> Flax model, float32 on CPU.

Every check asserts max|flax - torch| <= TOLERANCE * max|torch| and prints the achieved ratio
(run with -s to see it). Classifier logits at 224 (crossformer_tiny in the default run, the other
variants marked slow); backbone maps at two non-square sizes that need padding for one v1 and one
++ configuration with reduced depths; narrow models at a small size, on which the bugs a port is
prone to (LayerNorm epsilon, GELU form, DPB index, padding mask) are planted to show that the
bound catches each of them.
"""

import functools

import jax
import numpy as np
import pytest
import torch
from helpers import PRIMITIVES, primitives

import crossformer_jax.models.crossformer as flax_crossformer
from crossformer_jax.models import create_model
from crossformer_jax.models.crossformer import VARIANTS, group_layout
from crossformer_jax.reference.crossformer import create_torch_model, randomize_parameters
from crossformer_jax.runtime.compile_options import (
    CPU_INFERENCE_OPTIONS,
    inference_compiler_options,
)
from crossformer_jax.weights.convert import convert_torch_state_dict

# Float32 with the same operations in another order agrees to max|diff|/max|ref| <= 1.6e-6 on
# every output measured here (1e-6 typical: rounding of sums over hundreds to thousands of
# terms). 5e-6 leaves 3x headroom for other CPUs and XLA versions, and stays below what the
# smallest feared bug does: LayerNorm epsilon 1e-6 instead of 1e-5 moves the 224 logits of
# crossformer_tiny by 8.8e-6 and the narrow models below by more than 1e-4 (see
# test_planted_bug_breaks_parity).
TOLERANCE = 5e-6
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


def run_both(torch_model, flax_model, variables, height, width, seed, compiler_options=None):
    """Outputs on the same distinct random images, both as lists of NCHW (or (N, K)) arrays."""
    images = np.random.default_rng(seed).standard_normal((BATCH, 3, height, width))
    images = images.astype(np.float32)
    with torch.no_grad():
        reference = torch_model(torch.from_numpy(images))
    # A fresh function per call: no trace is shared with another test (planted bugs included).
    outputs = jax.jit(lambda v, x: flax_model.apply(v, x), compiler_options=compiler_options)(
        variables, images.transpose(0, 2, 3, 1)
    )
    if isinstance(reference, torch.Tensor):
        return [reference.numpy()], [np.asarray(outputs)]
    return (
        [r.numpy() for r in reference],
        [np.asarray(o).transpose(0, 3, 1, 2) for o in outputs],
    )  # NHWC -> NCHW


def parity_ratios(label, references, outputs):
    """max|out - ref| / max|ref| for each output, after checking shapes and finiteness."""
    ratios = []
    for i, (ref, out) in enumerate(zip(references, outputs)):
        assert ref.shape == out.shape, (label, i, ref.shape, out.shape)
        assert np.all(np.isfinite(out)), (label, i)
        # Distinct inputs give distinct outputs: the batch is not mixed up or broadcast.
        assert np.max(np.abs(ref[0] - ref[1])) > 1e-2 * np.max(np.abs(ref))
        ratio = float(np.max(np.abs(ref - out)) / np.max(np.abs(ref)))
        ratios.append(ratio)
        print(f'[parity] {label} output {i} {ref.shape}: max|diff|/max|ref| = {ratio:.2e}')
    assert len(references) == len(outputs)
    return ratios


def check_close(label, references, outputs):
    ratios = parity_ratios(label, references, outputs)
    assert max(ratios) <= TOLERANCE, (label, ratios)
    return ratios


# -------------------------------------------------------------------------------------------------
# Classifier logits at 224, every variant.

# The ++ classifier at 224 is covered in the default run by the ++ backbone maps below (same
# widths and grouping rules) and the narrow ++ classifier; its head by crossformer_tiny's.
FAST_VARIANTS = ('crossformer_tiny',)


@pytest.mark.parametrize(
    'name', [n if n in FAST_VARIANTS else pytest.param(n, marks=pytest.mark.slow) for n in VARIANTS]
)
@pytest.mark.parametrize('kernels', PRIMITIVES)
def test_classifier_logits_at_224(name, kernels, record_property):
    torch_model, flax_model, variables = build_pair(name, seed=1)
    with primitives(kernels):
        references, outputs = run_both(torch_model, flax_model, variables, 224, 224, seed=2)
    ratios = check_close(f'{name} logits 224 ({kernels})', references, outputs)
    record_property('parity_ratio', max(ratios))


def _fusions_with_dot_and_erf(hlo_text: str) -> int:
    """Fused computations of an optimized HLO module that hold both a matmul and an erf."""
    computations = hlo_text.split('\n}\n')
    return sum(' dot(' in c and ' erf(' in c for c in computations)


def test_inference_compiler_options_keep_parity():
    """The forward-only programs (evaluation, predict, throughput) compile with
    inference_compiler_options: on CPU the matmuls that XLA computes (all of them without the MKL
    custom call of the CPU plug-in) leave YNNPACK unfused (no fused computation holds a matmul and
    the GELU's erf any more), and the logits keep the parity bound."""
    options = inference_compiler_options()
    assert options == CPU_INFERENCE_OPTIONS  # this CPU's XLA knows the option
    assert inference_compiler_options('gpu') == {} and inference_compiler_options('tpu') == {}
    torch_model, flax_model, variables = build_pair('crossformer_tiny', seed=1)
    references, outputs = run_both(
        torch_model, flax_model, variables, 224, 224, seed=2, compiler_options=options
    )
    check_close('crossformer_tiny logits 224, inference options', references, outputs)
    images = jax.ShapeDtypeStruct((BATCH, 224, 224, 3), np.float32)
    forward = lambda v, x: flax_model.apply(v, x)  # noqa: E731
    default = jax.jit(forward).lower(variables, images).compile().as_text()
    unfused = jax.jit(forward, compiler_options=options).lower(variables, images).compile()
    assert _fusions_with_dot_and_erf(default) > 0
    assert _fusions_with_dot_and_erf(unfused.as_text()) == 0


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


@pytest.mark.parametrize('kernels', PRIMITIVES)
@pytest.mark.parametrize('version', sorted(BACKBONES))
def test_backbone_maps_non_square(version, kernels, record_property):
    name, overrides = BACKBONES[version]
    torch_model, flax_model, variables = build_pair(name, features_only=True, seed=3, **overrides)
    ratios = []
    # One model, both sizes in turn: nothing about the first input may be remembered.
    for k, (height, width) in enumerate(SIZES):
        with primitives(kernels):
            references, outputs = run_both(
                torch_model, flax_model, variables, height, width, seed=4 + k
            )
        expected_shapes = [
            (BATCH, 64 * 2**s, height // 2 ** (s + 2), width // 2 ** (s + 2)) for s in range(4)
        ]
        assert [r.shape for r in references] == expected_shapes
        ratios += check_close(f'{version} backbone {height}x{width}', references, outputs)
    record_property('parity_ratio', max(ratios))


# -------------------------------------------------------------------------------------------------
# Narrow models at a small size (fast), and the bugs the bound must catch.

NARROW = {
    # Widths 32..256 (the DPB MLP is 2 wide), padding in SDA at stages 0-1 and in the small-map rule
    # at stage 2, non-square v1 LDA groups.
    'v1': ('crossformer_tiny', dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))),
    # Padded LDA regions at stages 0-1, a padded whole-map group at stage 2, an ACL there.
    'pp': ('crossformer_pp_small', dict(embed_dim=32, depths=(2, 2, 4, 2), num_heads=(1, 2, 4, 8))),
}
NARROW_SIZE = (96, 128)


@functools.cache
def narrow_pair(version):
    """(torch model, flax model, variables) of a narrow backbone, built once per run."""
    name, overrides = NARROW[version]
    return build_pair(name, features_only=True, seed=5, **overrides)


def narrow_ratio(version):
    """The worst parity ratio over the four stage maps of the narrow backbone at NARROW_SIZE."""
    torch_model, flax_model, variables = narrow_pair(version)
    references, outputs = run_both(torch_model, flax_model, variables, *NARROW_SIZE, seed=6)
    return max(parity_ratios(f'narrow {version} {NARROW_SIZE}', references, outputs))


def test_narrow_models_cover_padding_and_lda():
    v1 = rules_exercised(*NARROW['v1'], [NARROW_SIZE])
    pp = rules_exercised(*NARROW['pp'], [NARROW_SIZE])
    assert {'SDA with padding', 'small map rule with padding', 'LDA stage 0'} <= v1
    assert 'non-square group' in v1
    assert {'LDA with padding', 'small map rule with padding', 'ACL'} <= pp


@pytest.mark.parametrize('version', sorted(NARROW))
def test_narrow_backbone_maps(version):
    assert narrow_ratio(version) <= TOLERANCE


def plant_layer_norm_epsilon(monkeypatch):
    monkeypatch.setattr(flax_crossformer, 'LAYER_NORM_EPS', 1e-6)  # Flax's default


def plant_tanh_gelu(monkeypatch):
    monkeypatch.setattr(flax_crossformer, 'gelu', functools.partial(jax.nn.gelu, approximate=True))


def plant_transposed_dpb_index(monkeypatch):
    """Query and key swapped in the gather index: every offset (dh, dw) read as (-dh, -dw)."""
    correct = flax_crossformer.relative_offsets
    monkeypatch.setattr(
        flax_crossformer,
        'relative_offsets',
        lambda gh, gw: (correct(gh, gw)[0], correct(gh, gw)[1].T),
    )


def plant_swapped_dpb_offsets(monkeypatch):
    """The DPB fed (dw, dh) instead of (dh, dw)."""
    correct = flax_crossformer.relative_offsets
    monkeypatch.setattr(
        flax_crossformer,
        'relative_offsets',
        lambda gh, gw: (correct(gh, gw)[0][:, ::-1].copy(), correct(gh, gw)[1]),
    )


def plant_mask_value(value):
    def plant(monkeypatch):
        monkeypatch.setattr(flax_crossformer, 'MASKED_LOGIT', value)
        # The key bias is cached per grid: a fresh cache here, the shared one is left untouched.
        uncached = flax_crossformer.padding_key_bias.__wrapped__
        monkeypatch.setattr(flax_crossformer, 'padding_key_bias', functools.cache(uncached))

    return plant


# A mask of -100 instead of -1e6 is not a bug in float32: exp(-100) = 4e-44 is below the
# resolution of any attention weight, so the outputs are identical. 0 (no mask) and -10 are bugs.
# Each bug on one version (the code is shared; one compile per planted bug keeps this fast).
PLANTED_BUGS = {
    'layer_norm_epsilon_1e-6': ('v1', plant_layer_norm_epsilon),
    'tanh_gelu': ('pp', plant_tanh_gelu),
    'transposed_dpb_index': ('v1', plant_transposed_dpb_index),
    'swapped_dpb_offsets': ('pp', plant_swapped_dpb_offsets),
    'mask_value_0': ('pp', plant_mask_value(0.0)),
    'mask_value_-10': ('v1', plant_mask_value(-10.0)),
}


@pytest.mark.parametrize('bug', sorted(PLANTED_BUGS))
def test_planted_bug_breaks_parity(bug, monkeypatch):
    version, plant = PLANTED_BUGS[bug]
    plant(monkeypatch)
    ratio = narrow_ratio(version)
    assert ratio > TOLERANCE, f'{bug} planted in the Flax model, parity still within the bound'
