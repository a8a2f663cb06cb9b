"""Tests of the Mask R-CNN and Cascade Mask R-CNN networks on CrossFormer: registry, exact
parameter counts, names and shapes in the MMDetection layout, initialisation, output shapes of
every method, BatchNorm of the cascade box heads, and errors."""

import functools
import math

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from random_weights import random_variables

import crossformer_jax
from crossformer_jax.detection.anchors import AnchorGenerator
from crossformer_jax.models import mask_rcnn as M

# Exact parameter counts at 80 classes, whole models and parts (MMDetection's counts).
PARAMETER_COUNTS = {
    'mask_rcnn_crossformer_small': 50_160_762,
    'mask_rcnn_crossformer_base': 71_474_922,
    'mask_rcnn_crossformer_pp_small': 42_962_340,
    'cascade_mask_rcnn_crossformer_small': 87_995_964,
}
FPN_PARAMETERS = {'crossformer_small': 2_729_984, 'crossformer_base': 2_729_984}
FPN_PARAMETERS['crossformer_pp_small'] = 2_607_104
RPN_PARAMETERS = 593_935
BOX_HEAD_PARAMETERS = 14_306_705
CASCADE_BOX_HEAD_PARAMETERS = 15_618_449  # 4 convs with BatchNorm (2,048 BN weights) + 1 fc
MASK_HEAD_PARAMETERS = 2_643_280

TINY = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))
NARROW = dict(
    fpn_channels=16,
    rpn_channels=8,
    box_conv_channels=8,
    box_fc_channels=32,
    mask_channels=8,
    num_mask_convs=2,
)


def abstract_variables(model, height=64, width=64):
    images = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)


def count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def shapes(tree):
    return jax.tree.map(lambda leaf: tuple(leaf.shape), tree)


def test_registry_lists_the_models_with_their_released_configs():
    assert set(PARAMETER_COUNTS) == set(crossformer_jax.list_models('instance_segmentation'))
    for name, backbone, cascade in [
        ('mask_rcnn_crossformer_small', 'crossformer_small', False),
        ('mask_rcnn_crossformer_base', 'crossformer_base', False),
        ('mask_rcnn_crossformer_pp_small', 'crossformer_pp_small', False),
        ('cascade_mask_rcnn_crossformer_small', 'crossformer_small', True),
    ]:
        model = crossformer_jax.create_model(name)
        assert isinstance(model, M.MaskRCNN) and model.num_classes == 80
        assert crossformer_jax.models.model_spec(name).task == 'instance_segmentation'
        released = crossformer_jax.models.crossformer.VARIANTS[backbone]
        assert (model.embed_dim, model.depths, model.num_heads, model.version) == (
            released['embed_dim'],
            tuple(released['depths']),
            tuple(released['num_heads']),
            released['version'],
        )
        assert model.drop_path_rate == {'crossformer_base': 0.3}.get(backbone, 0.2)
        assert (model.group_size, model.interval) == ((7, 7, 7, 7), (8, 4, 2, 1))
        assert model.cascade == cascade
        assert (model.num_box_convs, model.num_box_fcs) == ((4, 1) if cascade else (0, 2))
        assert (model.fpn_channels, model.rpn_channels, model.mask_channels) == (256, 256, 256)
        assert (model.box_conv_channels, model.box_fc_channels, model.num_mask_convs) == (
            256,
            1024,
            4,
        )
        anchors = model.rpn_anchor_generator
        assert anchors.strides == (4, 8, 16, 32, 64) and anchors.num_anchors == 3
        # One scale, 8 strides wide: the stride-4 level's square anchor is 32 x 32.
        np.testing.assert_allclose(anchors.base_anchors(0)[1], [-16, -16, 16, 16])


@pytest.mark.parametrize('name', sorted(PARAMETER_COUNTS))
def test_parameter_counts_are_exact(name):
    model = crossformer_jax.create_model(name)
    variables = abstract_variables(model)
    params = variables['params']
    assert count(params) == PARAMETER_COUNTS[name]
    assert crossformer_jax.count_params(name) == PARAMETER_COUNTS[name]
    assert sorted(params) == ['backbone', 'neck', 'roi_head', 'rpn_head']
    backbone = M.MASK_RCNN_VARIANTS[name]['backbone']
    assert count(params['neck']) == FPN_PARAMETERS[backbone]
    assert count(params['rpn_head']) == RPN_PARAMETERS
    roi_head = params['roi_head']
    if model.cascade:
        assert set(variables) == {'params', 'batch_stats'}
        assert sorted(roi_head) == [
            f'{head}_{s}' for head in ('bbox_head', 'mask_head') for s in range(3)
        ]
        for s in range(3):
            assert count(roi_head[f'bbox_head_{s}']) == CASCADE_BOX_HEAD_PARAMETERS
            assert count(roi_head[f'mask_head_{s}']) == MASK_HEAD_PARAMETERS
            bn = [v['bn'] for k, v in roi_head[f'bbox_head_{s}'].items() if 'shared_convs' in k]
            assert count(bn) == 2048
        # Running statistics are not parameters: 4 BatchNorms x 256 channels x (mean, var).
        assert count(variables['batch_stats']) == 3 * 4 * 2 * 256
    else:
        assert set(variables) == {'params'}
        assert sorted(roi_head) == ['bbox_head', 'mask_head']
        assert count(roi_head['bbox_head']) == BOX_HEAD_PARAMETERS
        assert count(roi_head['mask_head']) == MASK_HEAD_PARAMETERS


def test_parameter_names_follow_the_mmdetection_layout():
    params = abstract_variables(crossformer_jax.create_model('mask_rcnn_crossformer_small'))
    params = shapes(params['params'])
    neck = params['neck']
    assert sorted(neck) == sorted(
        [f'{kind}_convs_{i}' for kind in ('lateral', 'fpn') for i in range(4)]
    )
    for i, channels in enumerate((96, 192, 384, 768)):
        assert neck[f'lateral_convs_{i}']['conv'] == {
            'kernel': (1, 1, channels, 256),
            'bias': (256,),
        }
        assert neck[f'fpn_convs_{i}']['conv'] == {'kernel': (3, 3, 256, 256), 'bias': (256,)}
    assert params['rpn_head'] == {
        'rpn_conv': {'kernel': (3, 3, 256, 256), 'bias': (256,)},
        'rpn_cls': {'kernel': (1, 1, 256, 3), 'bias': (3,)},
        'rpn_reg': {'kernel': (1, 1, 256, 12), 'bias': (12,)},
    }
    assert params['roi_head']['bbox_head'] == {
        'shared_fcs_0': {'kernel': (256 * 7 * 7, 1024), 'bias': (1024,)},
        'shared_fcs_1': {'kernel': (1024, 1024), 'bias': (1024,)},
        'fc_cls': {'kernel': (1024, 81), 'bias': (81,)},
        'fc_reg': {'kernel': (1024, 320), 'bias': (320,)},
    }
    mask_head = {
        **{f'convs_{i}': {'conv': {'kernel': (3, 3, 256, 256), 'bias': (256,)}} for i in range(4)},
        'upsample': {'kernel': (2, 2, 256, 256), 'bias': (256,)},
        'conv_logits': {'kernel': (1, 1, 256, 80), 'bias': (80,)},
    }
    assert params['roi_head']['mask_head'] == mask_head

    cascade = abstract_variables(
        crossformer_jax.create_model('cascade_mask_rcnn_crossformer_small')
    )
    box = shapes(cascade['params']['roi_head']['bbox_head_2'])
    assert box == {
        **{
            f'shared_convs_{i}': {
                'conv': {'kernel': (3, 3, 256, 256)},
                'bn': {'scale': (256,), 'bias': (256,)},
            }
            for i in range(4)
        },
        'shared_fcs_0': {'kernel': (256 * 7 * 7, 1024), 'bias': (1024,)},
        'fc_cls': {'kernel': (1024, 81), 'bias': (81,)},
        'fc_reg': {'kernel': (1024, 320), 'bias': (320,)},
    }
    assert shapes(cascade['params']['roi_head']['mask_head_1']) == mask_head
    assert shapes(cascade['batch_stats']['roi_head']['bbox_head_0']['shared_convs_3']) == {
        'bn': {'mean': (256,), 'var': (256,)}
    }


def test_head_initialisation():
    rng = np.random.default_rng(0)
    levels = [jnp.asarray(rng.standard_normal((1, 8, 8, 32)), jnp.float32)]
    rpn = jax.jit(M.RPNHead(num_anchors=3, channels=64).init)(jax.random.key(0), levels)['params']
    for layer in ('rpn_conv', 'rpn_cls', 'rpn_reg'):
        assert abs(np.std(rpn[layer]['kernel']) - 0.01) < 0.002 and not np.any(rpn[layer]['bias'])

    features = jnp.asarray(rng.standard_normal((1, 2, 7, 7, 16)), jnp.float32)
    box_head = M.BoxHead(num_classes=20, num_convs=1, num_fcs=2, conv_channels=16, fc_channels=256)
    variables = jax.jit(box_head.init, static_argnums=2)(jax.random.key(1), features, False)
    box = variables['params']
    bound = math.sqrt(6 / (16 * 49 + 256))  # Xavier uniform
    kernel = np.asarray(box['shared_fcs_0']['kernel'])
    assert bound * 0.99 < np.abs(kernel).max() <= bound
    assert abs(np.std(box['fc_cls']['kernel']) - 0.01) < 0.001
    assert abs(np.std(box['fc_reg']['kernel']) - 0.001) < 0.0001
    # Kaiming normal, fan-out: std sqrt(2 / (3 * 3 * 16)).
    assert abs(np.std(box['shared_convs_0']['conv']['kernel']) / math.sqrt(2 / 144) - 1) < 0.1
    assert np.all(box['shared_convs_0']['bn']['scale'] == 1)
    stats = variables['batch_stats']['shared_convs_0']['bn']
    assert np.all(stats['mean'] == 0) and np.all(stats['var'] == 1)
    assert all(
        not np.any(box[k]['bias']) for k in ('shared_fcs_0', 'shared_fcs_1', 'fc_cls', 'fc_reg')
    )

    mask = jax.jit(M.MaskHead(num_classes=20, num_convs=1, channels=64).init)(
        jax.random.key(2), jnp.asarray(rng.standard_normal((1, 2, 14, 14, 16)), jnp.float32)
    )['params']
    # Fan-out as PyTorch counts it: out channels x kernel area; for the transposed conv (kernel
    # (2, 2, out, in)) its input channels x 4.
    for layer, fan_out in (('conv', 64 * 9), ('upsample', 64 * 4), ('conv_logits', 20)):
        kernel = mask['convs_0']['conv']['kernel'] if layer == 'conv' else mask[layer]['kernel']
        assert abs(np.std(kernel) / math.sqrt(2 / fan_out) - 1) < 0.1, layer
    assert not np.any(mask['upsample']['bias']) and not np.any(mask['conv_logits']['bias'])


def test_upsample_is_the_transposed_convolution():
    """Upsample2x: the same parameters (names, shapes, initial values) and outputs as a 2x2
    stride-2 transposed convolution, in value and gradient."""
    images = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, 6, 8)), jnp.float32)
    upsample = M.Upsample2x(12)
    transposed = flax.linen.ConvTranspose(
        12,
        (2, 2),
        strides=(2, 2),
        padding='VALID',
        transpose_kernel=True,
        kernel_init=M.KAIMING_FAN_OUT,
    )
    params = upsample.init(jax.random.key(4), images)
    reference = transposed.init(jax.random.key(4), images)
    assert jax.tree.structure(params) == jax.tree.structure(reference)
    for ours, theirs in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(ours, theirs)
    params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(5), p.shape), params)
    assert upsample.apply(params, images).shape == (2, 10, 12, 12)
    np.testing.assert_allclose(
        upsample.apply(params, images), transposed.apply(params, images), atol=2e-6
    )

    def gradient(module):
        return jax.grad(lambda p, x: jnp.sum(jnp.sin(module.apply(p, x))), argnums=(0, 1))(
            params, images
        )

    for ours, theirs in zip(
        jax.tree.leaves(gradient(upsample)), jax.tree.leaves(gradient(transposed))
    ):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope='module')
def tiny_cascade():
    model = crossformer_jax.create_model('cascade_mask_rcnn_crossformer_small', 3, **TINY, **NARROW)
    return model, random_variables(model)


def run_methods(model, variables, images, rois):
    """Every method of the model, then __call__: (levels, (objectness, deltas), [((class
    logits, box deltas), mask logits) per stage], __call__'s outputs)."""
    levels = model.apply(variables, images, method='features')
    rpn = model.apply(variables, levels, method='rpn')
    heads = [
        (
            model.apply(variables, levels, rois, stage, method='box_head'),
            model.apply(variables, levels, rois, stage, method='mask_head'),
        )
        for stage in range(3)
    ]
    return levels, rpn, heads, model.apply(variables, images, rois)


ROIS = [[0, 0, 30, 40], [8, 4, 60, 20], [1, 1, 5, 9]]


@pytest.mark.parametrize(
    'size, level_sizes',
    [
        ((64, 96), [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]),
        ((160, 64), [(40, 16), (20, 8), (10, 4), (5, 2), (3, 1)]),
    ],
)
def test_every_method_gives_its_shapes(tiny_cascade, size, level_sizes):
    model, variables = tiny_cascade
    images = jax.ShapeDtypeStruct((2, *size, 3), jnp.float32)
    rois = jax.ShapeDtypeStruct((2, 3, 4), jnp.float32)
    levels, (objectness, deltas), heads, outputs = jax.eval_shape(
        functools.partial(run_methods, model), variables, images, rois
    )
    assert [x.shape for x in levels] == [(2, h, w, 16) for h, w in level_sizes]
    assert [x.shape for x in objectness] == [(2, h, w, 3) for h, w in level_sizes]
    assert [x.shape for x in deltas] == [(2, h, w, 12) for h, w in level_sizes]
    for (class_logits, box_deltas), mask_logits in heads:
        assert class_logits.shape == (2, 3, 4) and box_deltas.shape == (2, 3, 12)
        assert mask_logits.shape == (2, 3, 28, 28, 3)
    assert shapes(outputs) == shapes(
        {
            'objectness': objectness,
            'rpn_deltas': deltas,
            'class_logits': tuple(logits for (logits, _), _ in heads),
            'box_deltas': tuple(deltas for (_, deltas), _ in heads),
            'mask_logits': tuple(masks for _, masks in heads),
        }
    )
    leaves = jax.tree.leaves((levels, objectness, deltas, heads, outputs))
    assert {x.dtype for x in leaves} == {jnp.dtype(jnp.float32)}


def test_methods_agree_with_the_whole_model(tiny_cascade):
    model, variables = tiny_cascade
    # Twice the same image, with its RoIs in reverse order the second time.
    images = jnp.tile(jax.random.normal(jax.random.key(1), (1, 64, 96, 3)), (2, 1, 1, 1))
    rois = jnp.asarray([ROIS, ROIS[::-1]], jnp.float32)
    levels, (objectness, deltas), heads, outputs = jax.jit(functools.partial(run_methods, model))(
        variables, images, rois
    )
    # The fifth level max-pools the fourth with kernel 1, stride 2.
    np.testing.assert_array_equal(levels[4], levels[3][:, ::2, ::2])
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(heads))
    # The stages hold different weights; __call__ runs each one on the same RoIs.
    assert not np.allclose(heads[0][0][0], heads[1][0][0])
    # A RoI's outputs depend on its image and box only.
    for outputs_of_stage in jax.tree.leaves(heads):
        np.testing.assert_allclose(
            outputs_of_stage[1], outputs_of_stage[0, ::-1], rtol=1e-5, atol=1e-6
        )
    for stage, ((class_logits, box_deltas), mask_logits) in enumerate(heads):
        np.testing.assert_array_equal(outputs['class_logits'][stage], class_logits)
        np.testing.assert_array_equal(outputs['box_deltas'][stage], box_deltas)
        np.testing.assert_array_equal(outputs['mask_logits'][stage], mask_logits)
    for level in range(5):
        np.testing.assert_array_equal(outputs['objectness'][level], objectness[level])
        np.testing.assert_array_equal(outputs['rpn_deltas'][level], deltas[level])


def test_cascade_box_heads_use_and_update_batch_statistics(tiny_cascade):
    model, variables = tiny_cascade
    images = jax.random.normal(jax.random.key(2), (1, 64, 64, 3))
    rois = jnp.asarray([[*ROIS, [10, 10, 64, 64]]], jnp.float32)
    levels = jax.jit(lambda v, x: model.apply(v, x, method='features'))(variables, images)

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def box_head(variables, stage, train):
        return model.apply(
            variables, levels, rois, stage, train, method='box_head', mutable=['batch_stats']
        )

    (eval_logits, _), unchanged = box_head(variables, 1, False)
    assert jax.tree.all(
        jax.tree.map(np.array_equal, unchanged, {'batch_stats': variables['batch_stats']})
    )
    (train_logits, _), updated = box_head(variables, 1, True)
    assert not np.allclose(train_logits, eval_logits)
    before = variables['batch_stats']['roi_head']
    after = updated['batch_stats']['roi_head']
    # Only stage 1's running statistics move.
    for stage in (0, 2):
        assert jax.tree.all(
            jax.tree.map(np.array_equal, after[f'bbox_head_{stage}'], before[f'bbox_head_{stage}'])
        )
    # By PyTorch's momentum 0.1: from zero running means the update is 0.1 x the batch mean,
    # which training does not read from the running statistics.
    zeroed = jax.tree.map(np.zeros_like, variables['batch_stats'])
    (zeroed_logits, _), from_zero = box_head({**variables, 'batch_stats': zeroed}, 1, True)
    np.testing.assert_array_equal(zeroed_logits, train_logits)
    for i in range(4):
        path = ('roi_head', 'bbox_head_1', f'shared_convs_{i}', 'bn', 'mean')
        old, new, batch = (
            functools.reduce(lambda tree, key: tree[key], path, tree)
            for tree in (variables['batch_stats'], updated['batch_stats'], from_zero['batch_stats'])
        )
        assert np.abs(batch).max() > 1e-3
        np.testing.assert_allclose(new - 0.9 * old, batch, rtol=1e-5, atol=1e-6)


def test_roi_exact_extent_changes_only_the_rois_beyond_it():
    """roi_exact_extent 28 (a smaller RoIAlign patch): RoIs up to 28 map pixels pool exactly as
    with the default 56; a RoI of 160 x 24 image pixels (40 map pixels on level 0) does not."""
    default = crossformer_jax.create_model('mask_rcnn_crossformer_small', 3, **TINY, **NARROW)
    smaller = default.clone(roi_exact_extent=28)
    images = jnp.asarray(np.random.default_rng(6).standard_normal((1, 64, 160, 3)), jnp.float32)
    variables = random_variables(default, images.shape[1:3])
    # Three RoIs within 28 map pixels, then one of 160 x 24 image pixels (RoIs pool separately).
    rois = jnp.asarray(
        [[[3, 5, 90, 60], [10, 2, 40, 50], [0, 0, 100, 30], [0, 20, 160, 44]]], jnp.float32
    )

    @jax.jit
    def heads(variables, images):
        levels = default.apply(variables, images, method='features')
        return [
            [model.apply(variables, levels, rois, method=method) for model in (smaller, default)]
            for method in ('box_head', 'mask_head')
        ]

    for ours, exact in heads(variables, images):
        for ours_leaf, exact_leaf in zip(jax.tree.leaves(ours), jax.tree.leaves(exact)):
            np.testing.assert_array_equal(ours_leaf[:, :3], exact_leaf[:, :3])
            assert not np.allclose(ours_leaf[:, 3], exact_leaf[:, 3], rtol=1e-3, atol=1e-4)


def test_bfloat16_compute_keeps_float32_variables_and_outputs():
    model = crossformer_jax.create_model(
        'mask_rcnn_crossformer_pp_small', num_classes=4, dtype='bfloat16', **TINY, **NARROW
    )
    variables = abstract_variables(model)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    outputs = jax.eval_shape(model.apply, variables, jnp.ones((1, 64, 64, 3)))
    assert {leaf.dtype for leaf in jax.tree.leaves(outputs)} == {jnp.dtype(jnp.float32)}
    assert outputs['mask_logits'][0].shape == (1, 1, 28, 28, 4)


def head_outputs(model, variables, levels, rois, method, stage=0):
    """The shapes of a head method's outputs (traced, not run)."""
    return jax.eval_shape(
        lambda v, maps, boxes: model.apply(v, maps, boxes, stage, method=method),
        variables,
        levels,
        rois,
    )


def test_bad_inputs_and_configs_raise_clear_errors(tiny_cascade):
    model, variables = tiny_cascade
    images = jnp.zeros((2, 64, 64, 3))
    levels = jax.eval_shape(lambda v, x: model.apply(v, x, method='features'), variables, images)
    rois = jnp.zeros((2, 5, 4))
    message = r'stage must be an integer in \[0, 3\) for a cascade RoI head, got 3'
    with pytest.raises(ValueError, match=message):
        head_outputs(model, variables, levels, rois, 'box_head', stage=3)
    with pytest.raises(ValueError, match=r'rois must be \(B, R, 4\)'):
        head_outputs(model, variables, levels, jnp.zeros((10, 4)), 'mask_head')
    with pytest.raises(ValueError, match=r'features\[0\] must be \(B=3, H, W, C=16\)'):
        head_outputs(model, variables, levels, jnp.zeros((3, 5, 4)), 'box_head')
    plain = crossformer_jax.create_model('mask_rcnn_crossformer_small', 3, **TINY, **NARROW)
    plain_variables = abstract_variables(plain)
    message = r'stage must be an integer in \[0, 1\) for a RoI head, got 1'
    with pytest.raises(ValueError, match=message):
        head_outputs(plain, plain_variables, levels, rois, 'mask_head', stage=1)
    with pytest.raises(ValueError, match='multiples of 32, got 64x80'):
        abstract_variables(plain, 64, 80)

    create = crossformer_jax.create_model
    with pytest.raises(ValueError, match=r"unknown override\(s\) \['head_channels'\]"):
        create('mask_rcnn_crossformer_small', head_channels=64)
    with pytest.raises(ValueError, match='features_only does not apply'):
        create('cascade_mask_rcnn_crossformer_small', features_only=True)
    with pytest.raises(ValueError, match='num_classes must be a positive integer, got 0'):
        create('mask_rcnn_crossformer_base', num_classes=0)
    with pytest.raises(ValueError, match='box_fc_channels must be an integer >= 1, got 0'):
        create('mask_rcnn_crossformer_small', box_fc_channels=0)
    with pytest.raises(ValueError, match='num_mask_convs must be an integer >= 0, got -1'):
        create('mask_rcnn_crossformer_small', num_mask_convs=-1)
    with pytest.raises(ValueError, match='roi_exact_extent must be an integer >= 1, got 0'):
        create('mask_rcnn_crossformer_small', roi_exact_extent=0)
    with pytest.raises(ValueError, match=r'strides must be the FPN strides \(4, 8, 16, 32, 64\)'):
        create('mask_rcnn_crossformer_small', rpn_anchor_generator=AnchorGenerator())
    with pytest.raises(ValueError, match='unknown Mask R-CNN model'):
        M.mask_rcnn_config('retinanet_crossformer_small')
    # Another anchor set changes the RPN's width: 2 ratios x 2 scales.
    anchors = AnchorGenerator(strides=(4, 8, 16, 32, 64), scales_per_octave=2, ratios=(0.5, 2.0))
    wide = create('mask_rcnn_crossformer_small', 3, rpn_anchor_generator=anchors, **TINY, **NARROW)
    rpn = abstract_variables(wide)['params']['rpn_head']
    assert rpn['rpn_cls']['kernel'].shape == (1, 1, 8, 4) and rpn['rpn_reg']['kernel'].shape == (
        1,
        1,
        8,
        16,
    )
