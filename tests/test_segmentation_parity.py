"""Parity of the Flax segmentation models with their PyTorch reference (torch_segmentation).

Random weights and random BatchNorm running statistics, converted with the checkpoint converter,
eval mode, float32; logits (and the auxiliary head's logits) compared at the input resolution.
The default suite uses reduced backbones (narrow, few blocks, but with LDA blocks and, for ++, an
ACL) with narrow heads; the full-size models run with -m slow.
"""

import pytest
import torch

from crossformer_jax.reference.crossformer import randomize_parameters
from crossformer_jax.reference.segmentation import (
    create_torch_segmentation_model,
    randomize_batch_norm_statistics,
)
from crossformer_jax.weights import convert as C
from crossformer_jax.weights import verify

# Observed max|diff| / max|reference|: 1e-6 to 1.8e-6 (float32 rounding of the same sums taken in
# a different order: XLA's convolutions and attention vs PyTorch's, ~20 layers deep); the bound
# leaves a factor 5 of headroom and stays 10x inside the 1e-4 acceptance bound.
RELATIVE_TOLERANCE = 1e-5

# Two blocks per stage (SDA then LDA); ++ with four blocks in stage 2 (block 2 has an ACL).
REDUCED_V1 = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
REDUCED_PP = dict(embed_dim=32, depths=(2, 2, 4, 2), num_heads=(1, 2, 4, 8))
NARROW_UPERNET = dict(head_channels=32, aux_channels=24)
NARROW_FPN = dict(head_channels=24, neck_channels=32)

# 384x640: the stride-32 map is 12x20, whose pooled bins (3 and 6 bins over 20) have uneven sizes.
CASES = [
    ('upernet_crossformer_small', REDUCED_V1, NARROW_UPERNET, (512, 512)),
    ('fpn_crossformer_pp_small', REDUCED_PP, NARROW_FPN, (512, 512)),
    ('upernet_crossformer_pp_small', REDUCED_PP, NARROW_UPERNET, (384, 640)),
    ('fpn_crossformer_small', REDUCED_V1, NARROW_FPN, (384, 640)),  # groups 14, intervals 16, 8
]
SLOW_CASES = [
    ('upernet_crossformer_small', REDUCED_V1, NARROW_UPERNET, (384, 640)),
    ('fpn_crossformer_pp_small', REDUCED_PP, NARROW_FPN, (384, 640)),
    ('upernet_crossformer_pp_small', REDUCED_PP, NARROW_UPERNET, (512, 512)),
    ('fpn_crossformer_small', REDUCED_V1, NARROW_FPN, (512, 512)),
    ('upernet_crossformer_small', {}, {}, (512, 512)),
    ('upernet_crossformer_pp_small', {}, {}, (384, 640)),
    ('fpn_crossformer_small', {}, {}, (384, 640)),
    ('fpn_crossformer_base', {}, {}, (512, 512)),
    ('fpn_crossformer_pp_small', {}, {}, (512, 512)),
]


def check_parity(name, backbone, head, image_size, num_classes=150, seed=0):
    torch_model = create_torch_segmentation_model(name, num_classes, **backbone, **head)
    randomize_parameters(torch_model, seed)
    randomize_batch_norm_statistics(torch_model, seed + 1)
    state_dict = torch_model.state_dict()
    variables, report = C.convert_with_report(state_dict, name, **backbone)
    assert report.overrides == {**head, **backbone}
    comparisons = verify.compare_with_torch(
        state_dict,
        variables,
        name,
        num_classes=num_classes,
        features_only=False,
        image_size=image_size,
        **report.overrides,
    )
    labels = ['logits', 'auxiliary logits'] if name.startswith('upernet') else ['logits']
    assert [c.label for c in comparisons] == labels
    for c in comparisons:
        assert c.shape == (1, num_classes, *image_size)
        assert c.max_abs_reference > 0.1  # the outputs are not degenerate
        assert c.relative <= RELATIVE_TOLERANCE, c


@pytest.mark.parametrize('name, backbone, head, image_size', CASES)
def test_reduced_models_match_the_reference(name, backbone, head, image_size):
    with torch.no_grad():
        check_parity(name, backbone, head, image_size)


@pytest.mark.slow
@pytest.mark.parametrize('name, backbone, head, image_size', SLOW_CASES)
def test_more_sizes_and_full_size_models_match_the_reference(name, backbone, head, image_size):
    with torch.no_grad():
        check_parity(name, backbone, head, image_size)
