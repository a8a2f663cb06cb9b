"""Tests of the detection models (RetinaNet on CrossFormer): registry, parameter counts, names,
initialisation, output shapes, and the PyTorch reference's anchors, box decoding and NMS."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from random_weights import random_variables

import crossformer_jax
from crossformer_jax.detection.anchors import AnchorGenerator
from crossformer_jax.models import detection as D
from crossformer_jax.reference import detection as R

# Exact parameter counts at 80 classes (backbone without norm/head, FPN neck, RetinaHead).
PARAMETER_COUNTS = {
    'retinanet_crossformer_small': 40_824_958,
    'retinanet_crossformer_base': 62_139_118,
    'retinanet_crossformer_pp_small': 33_044_904,
}
FPN_PARAMETERS = {
    'retinanet_crossformer_small': 4_474_880,
    'retinanet_crossformer_pp_small': 3_770_368,
}
HEAD_PARAMETERS = 6_463_220

TINY = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))
NARROW = dict(fpn_channels=24, head_channels=16, num_head_convs=2)


def abstract_variables(model, height=64, width=64):
    images = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)


def count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def test_registry_lists_the_detection_models_with_their_released_configs():
    assert crossformer_jax.list_models('detection') == sorted(PARAMETER_COUNTS)
    for name, drop_path, version in [
        ('retinanet_crossformer_small', 0.2, 'v1'),
        ('retinanet_crossformer_base', 0.3, 'v1'),
        ('retinanet_crossformer_pp_small', 0.2, 'pp'),
    ]:
        model = crossformer_jax.create_model(name)
        assert isinstance(model, D.RetinaNet) and model.num_classes == 80
        assert (model.group_size, model.interval) == ((7, 7, 7, 7), (8, 4, 2, 1))
        assert (model.drop_path_rate, model.version) == (drop_path, version)
        assert (model.fpn_channels, model.head_channels, model.num_head_convs) == (256, 256, 4)
        assert model.anchor_generator == AnchorGenerator()
    base = crossformer_jax.create_model('retinanet_crossformer_base')
    assert (base.embed_dim, base.depths, base.num_heads) == (96, (2, 2, 18, 2), (3, 6, 12, 24))
    pp = crossformer_jax.create_model('retinanet_crossformer_pp_small')
    assert (pp.embed_dim, pp.depths, pp.num_heads) == (64, (2, 2, 18, 2), (2, 4, 8, 16))


@pytest.mark.parametrize('name', sorted(PARAMETER_COUNTS))
def test_parameter_counts_are_exact(name):
    variables = abstract_variables(crossformer_jax.create_model(name))
    assert set(variables) == {'params'}
    params = variables['params']
    assert count(params) == PARAMETER_COUNTS[name]
    assert count(params['bbox_head']) == HEAD_PARAMETERS
    if name in FPN_PARAMETERS:
        assert count(params['neck']) == FPN_PARAMETERS[name]
    assert crossformer_jax.count_params(name) == PARAMETER_COUNTS[name]


def test_parameter_names_follow_the_mmdetection_layout():
    params = abstract_variables(crossformer_jax.create_model('retinanet_crossformer_small'))[
        'params'
    ]
    assert sorted(params) == ['backbone', 'bbox_head', 'neck']
    neck = params['neck']
    assert sorted(neck) == sorted(
        [f'lateral_convs_{i}' for i in range(3)] + [f'fpn_convs_{i}' for i in range(5)]
    )
    for i, channels in enumerate((192, 384, 768)):
        assert neck[f'lateral_convs_{i}']['conv']['kernel'].shape == (1, 1, channels, 256)
    assert neck['fpn_convs_3']['conv']['kernel'].shape == (3, 3, 768, 256)  # on the input
    assert neck['fpn_convs_4']['conv']['kernel'].shape == (3, 3, 256, 256)
    assert sorted(neck['fpn_convs_0']['conv']) == ['bias', 'kernel']
    head = params['bbox_head']
    assert sorted(head) == sorted(
        [f'{tower}_convs_{i}' for tower in ('cls', 'reg') for i in range(4)]
        + ['retina_cls', 'retina_reg']
    )
    assert head['cls_convs_3']['conv']['kernel'].shape == (3, 3, 256, 256)
    assert head['retina_cls']['kernel'].shape == (3, 3, 256, 9 * 80)
    assert head['retina_reg']['kernel'].shape == (3, 3, 256, 9 * 4)
    # The backbone is the features_only CrossFormer: no final norm, no classifier head.
    assert 'norm' not in params['backbone'] and 'head' not in params['backbone']


def test_fpn_and_head_initialisation():
    rng = np.random.default_rng(0)
    features = [
        jnp.asarray(rng.standard_normal((1, 16 // 2**i, 16 // 2**i, 8 * 2**i)), jnp.float32)
        for i in range(4)
    ]
    neck = D.FPN(channels=32)
    neck_params = jax.jit(neck.init)(jax.random.key(0), features)['params']
    kernel = np.asarray(neck_params['fpn_convs_3']['conv']['kernel'])  # (3, 3, 64, 32)
    bound = math.sqrt(6 / (9 * 64 + 9 * 32))  # Xavier uniform
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.95 * bound
    assert all(np.all(conv['conv']['bias'] == 0) for conv in neck_params.values())

    levels = jax.jit(neck.apply)({'params': neck_params}, features)
    head = D.RetinaHead(num_classes=5, num_anchors=9, channels=32, num_convs=2)
    head_params = jax.jit(head.init)(jax.random.key(1), levels)['params']
    for name in ('cls_convs_0', 'reg_convs_1'):
        assert abs(np.std(head_params[name]['conv']['kernel']) - 0.01) < 0.001
        assert np.all(head_params[name]['conv']['bias'] == 0)
    assert abs(np.std(head_params['retina_cls']['kernel']) - 0.01) < 0.001
    np.testing.assert_allclose(head_params['retina_cls']['bias'], -math.log(99), rtol=1e-6)
    assert np.all(head_params['retina_reg']['bias'] == 0)
    # So every class starts at the prior score 0.01 (the kernels barely move it).
    class_logits, _ = jax.jit(head.apply)({'params': head_params}, levels)
    np.testing.assert_allclose(jax.nn.sigmoid(class_logits[0]), 0.01, atol=2e-3)


@pytest.mark.parametrize(
    'size, level_sizes',
    [
        ((64, 96), [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]),
        ((160, 64), [(20, 8), (10, 4), (5, 2), (3, 1), (2, 1)]),
    ],
)
def test_outputs_of_every_level(size, level_sizes):
    model = crossformer_jax.create_model(
        'retinanet_crossformer_small', num_classes=3, **TINY, **NARROW
    )
    variables = random_variables(model)
    images = jax.random.normal(jax.random.key(1), (2, *size, 3))
    class_logits, box_deltas = jax.jit(model.apply)(variables, images)
    assert len(class_logits) == len(box_deltas) == 5
    assert [x.shape for x in class_logits] == [(2, h, w, 27) for h, w in level_sizes]
    assert [x.shape for x in box_deltas] == [(2, h, w, 36) for h, w in level_sizes]
    assert {x.dtype for x in class_logits + box_deltas} == {jnp.dtype(jnp.float32)}
    assert all(np.all(np.isfinite(x)) for x in class_logits + box_deltas)
    # The level sizes are the anchor generator's for the padded input.
    assert AnchorGenerator().feature_sizes(*size) == level_sizes


def test_bfloat16_compute_keeps_float32_variables_and_outputs():
    model = crossformer_jax.create_model(
        'retinanet_crossformer_pp_small', num_classes=4, dtype='bfloat16', **TINY, **NARROW
    )
    variables = abstract_variables(model)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    outputs = jax.eval_shape(model.apply, variables, jnp.ones((1, 64, 64, 3)))
    assert {leaf.dtype for leaf in jax.tree.leaves(outputs)} == {jnp.dtype(jnp.float32)}


def test_bad_inputs_and_configs_raise_clear_errors():
    model = crossformer_jax.create_model('retinanet_crossformer_small', num_classes=3, **TINY)
    for shape, message in [
        ((1, 64, 80, 3), 'multiples of 32, got 64x80'),
        ((1, 64, 64, 1), '3 channels'),
        ((64, 64, 3), 'rank 4'),
    ]:
        with pytest.raises(ValueError, match=message):
            jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))
    create = crossformer_jax.create_model
    with pytest.raises(ValueError, match=r"unknown override\(s\) \['neck_channels'\]"):
        create('retinanet_crossformer_small', neck_channels=64)
    with pytest.raises(ValueError, match='features_only does not apply'):
        create('retinanet_crossformer_small', features_only=True)
    with pytest.raises(ValueError, match='num_classes must be a positive integer, got 0'):
        create('retinanet_crossformer_small', num_classes=0)
    with pytest.raises(ValueError, match='num_head_convs must be an integer >= 0, got -1'):
        create('retinanet_crossformer_small', num_head_convs=-1)
    with pytest.raises(ValueError, match=r'strides must be the FPN strides \(8, 16, 32, 64, 128\)'):
        create('retinanet_crossformer_small', anchor_generator=AnchorGenerator(strides=(8, 16)))
    with pytest.raises(ValueError, match='unknown detection model'):
        D.detection_config('retinanet_crossformer_tiny')
    # Another anchor set changes the head's width: A = 2 ratios x 2 scales.
    anchors = AnchorGenerator(scales_per_octave=2, ratios=(0.5, 2.0))
    narrow = create('retinanet_crossformer_small', num_classes=3, anchor_generator=anchors, **TINY)
    shapes = abstract_variables(narrow)['params']['bbox_head']
    assert shapes['retina_cls']['kernel'].shape[-1] == 4 * 3
    assert shapes['retina_reg']['kernel'].shape[-1] == 4 * 4


# -------------------------------------------------------------------------------------------------
# The PyTorch reference's post-processing pieces.


def test_reference_anchors_equal_the_anchor_generator():
    generator = AnchorGenerator()
    sizes = generator.feature_sizes(96, 64)
    for level, (anchors, (h, w)) in enumerate(zip(generator.grid_anchors(sizes), sizes)):
        reference = R.level_anchors(h, w, generator.strides[level], 4.0, 3, (0.5, 1.0, 2.0))
        np.testing.assert_array_equal(reference.numpy(), anchors)
    # Level 0 at (y=1, x=2): ratio 0.5 (wide), scale 4: 8 * sqrt(2) * 4 wide, 8 / sqrt(2) * 4 high.
    anchor = R.level_anchors(2, 3, 8, 4.0, 3, (0.5, 1.0, 2.0))[(1 * 3 + 2) * 9 + 0]
    w, h = 32 * math.sqrt(2), 32 / math.sqrt(2)
    np.testing.assert_allclose(anchor, [16 - w / 2, 8 - h / 2, 16 + w / 2, 8 + h / 2], rtol=1e-6)


def test_reference_decoding_clamps_and_clips():
    anchors = torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 8.0, 8.0]])
    deltas = torch.tensor([[0.5, -0.25, math.log(2.0), 0.0], [0.0, 0.0, 10.0, -10.0]])
    boxes = R.decode_boxes(anchors, deltas, height=100, width=50)
    # Centre (20, 40) + (0.5 * 20, -0.25 * 40); width doubled to 40, height 40.
    np.testing.assert_allclose(boxes[0], [10.0, 10.0, 50.0, 50.0], rtol=1e-6)
    # log ratios clamped to +-log(1000 / 16): width 8 * 62.5 = 500 (clipped to [0, 50]).
    np.testing.assert_allclose(boxes[1], [0.0, 4 - 0.064, 50.0, 4 + 0.064], rtol=1e-5)


def test_reference_nms_keeps_the_best_of_each_overlapping_group():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],
            [1.0, 0.0, 11.0, 10.0],  # IoU 9 / 11 with box 0: suppressed
            [0.0, 0.0, 10.0, 5.0],  # IoU exactly 0.5 with box 0: kept (suppression needs > 0.5)
            [20.0, 20.0, 30.0, 30.0],
        ]
    )
    scores = torch.tensor([0.9, 0.95, 0.5, 0.3])
    assert R.greedy_nms(boxes, scores, 0.5).tolist() == [1, 2, 3]
