"""Tests of the segmentation models: registry, parameter counts, outputs, BatchNorm, resampling."""

import functools
import math
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from random_weights import random_variables

import crossformer_jax
from crossformer_jax.models import segmentation as S

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Exact parameter counts at 150 classes (backbone without norm/head, decode head, auxiliary head).
PARAMETER_COUNTS = {
    'upernet_crossformer_small': 62_308_022,
    'upernet_crossformer_base': 83_622_182,
    'upernet_crossformer_large': 125_478_836,
    'upernet_crossformer_pp_small': 53_118_944,
    'fpn_crossformer_small': 34_260_000,
    'fpn_crossformer_base': 55_574_160,
    'fpn_crossformer_large': 95_440_158,
    'fpn_crossformer_pp_small': 27_061_578,
}

TINY = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), head_channels=32)


def abstract_variables(model, height=64, width=64):
    images = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)


def test_registry_lists_the_segmentation_models():
    names = crossformer_jax.list_models()
    assert set(PARAMETER_COUNTS) <= set(names)
    assert set(crossformer_jax.VARIANTS) <= set(names)
    assert len(names) == len(set(names))


@pytest.mark.parametrize('name', sorted(PARAMETER_COUNTS))
def test_parameter_counts_are_exact(name):
    variables = abstract_variables(crossformer_jax.create_model(name, num_classes=150))
    count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables['params']))
    assert count == PARAMETER_COUNTS[name]
    assert set(variables) == {'params', 'batch_stats'}


@pytest.mark.parametrize(
    'name, group_size, interval, version',
    [
        ('upernet_crossformer_small', (7, 7, 7, 7), (8, 4, 2, 1), 'v1'),
        ('upernet_crossformer_large', (7, 7, 7, 7), (8, 4, 2, 1), 'v1'),
        ('fpn_crossformer_small', (14, 14, 7, 7), (16, 8, 2, 1), 'v1'),
        ('fpn_crossformer_base', (7, 7, 7, 7), (8, 4, 2, 1), 'v1'),
        ('fpn_crossformer_large', (14, 14, 7, 7), (16, 8, 2, 1), 'v1'),
        ('upernet_crossformer_pp_small', (7, 7, 7, 7), (8, 4, 2, 1), 'pp'),
        ('fpn_crossformer_pp_small', (7, 7, 7, 7), (8, 4, 2, 1), 'pp'),
    ],
)
def test_backbone_geometry_of_the_released_configs(name, group_size, interval, version):
    model = crossformer_jax.create_model(name, num_classes=150)
    assert (model.group_size, model.interval, model.version) == (group_size, interval, version)


def test_head_widths_and_drop_path_of_the_released_configs():
    upernet = crossformer_jax.create_model('upernet_crossformer_large', num_classes=150)
    assert (upernet.head_channels, upernet.aux_channels, upernet.drop_path_rate) == (512, 256, 0.5)
    fpn = crossformer_jax.create_model('fpn_crossformer_small', num_classes=150)
    assert (fpn.head_channels, fpn.neck_channels, fpn.aux_channels) == (128, 256, None)
    assert fpn.drop_path_rate == 0.2


def test_parameter_names_follow_the_mmsegmentation_layout():
    upernet = abstract_variables(crossformer_jax.create_model('upernet_crossformer_small', 150))
    head = upernet['params']['decode_head']
    assert sorted(head) == sorted(
        [f'psp_modules_{k}_1' for k in range(4)]
        + [f'lateral_convs_{i}' for i in range(3)]
        + [f'fpn_convs_{i}' for i in range(3)]
        + ['bottleneck', 'fpn_bottleneck', 'conv_seg']
    )
    assert head['bottleneck']['conv']['kernel'].shape == (3, 3, 768 + 4 * 512, 512)
    assert sorted(head['bottleneck']['bn']) == ['bias', 'scale']
    assert sorted(upernet['batch_stats']['decode_head']['bottleneck']['bn']) == ['mean', 'var']
    aux = upernet['params']['auxiliary_head']
    assert aux['convs_0']['conv']['kernel'].shape == (3, 3, 384, 256)
    assert aux['conv_seg']['kernel'].shape == (1, 1, 256, 150)

    fpn = abstract_variables(crossformer_jax.create_model('fpn_crossformer_base', 150))
    assert sorted(fpn['params']) == ['backbone', 'decode_head', 'neck']
    assert sorted(fpn['params']['neck']['lateral_convs_3']['conv']) == ['bias', 'kernel']
    assert sorted(fpn['params']['decode_head']) == sorted(
        [f'scale_heads_{i}_{j}' for i in range(4) for j in range(0, 2 * max(1, i), 2)]
        + ['conv_seg']
    )
    assert 'neck' not in fpn['batch_stats']


def jitted(model):
    """(eval apply, train apply) of a model, compiled."""
    evaluate = jax.jit(model.apply)
    train = jax.jit(
        lambda v, x, key: model.apply(
            v, x, train=True, rngs={'dropout': key}, mutable=['batch_stats']
        )
    )
    return evaluate, train


@pytest.mark.parametrize('name', ['upernet_crossformer_small', 'fpn_crossformer_pp_small'])
def test_eval_and_train_outputs(name):
    model = crossformer_jax.create_model(name, num_classes=11, **TINY)
    evaluate, train = jitted(model)
    images = jax.random.normal(jax.random.key(1), (2, 64, 96, 3))
    variables = random_variables(model)
    logits = evaluate(variables, images)
    assert logits.shape == (2, 64, 96, 11) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))

    (train_logits, aux_logits), updates = train(variables, images, jax.random.key(2))
    assert train_logits.shape == (2, 64, 96, 11) and train_logits.dtype == jnp.float32
    if name.startswith('upernet'):
        assert aux_logits.shape == (2, 64, 96, 11) and aux_logits.dtype == jnp.float32
    else:
        assert aux_logits is None
    assert jax.tree.structure(updates['batch_stats']) == jax.tree.structure(
        variables['batch_stats']
    )
    changed = jax.tree.map(
        lambda a, b: bool(np.any(a != b)), updates['batch_stats'], variables['batch_stats']
    )
    assert all(jax.tree.leaves(changed))
    # Evaluation reads the running statistics: new statistics change the eval logits.
    updated = {'params': variables['params'], 'batch_stats': updates['batch_stats']}
    assert not np.allclose(evaluate(updated, images), logits)


def test_bfloat16_compute_keeps_float32_variables_and_logits():
    model = crossformer_jax.create_model(
        'fpn_crossformer_small', num_classes=5, dtype='bfloat16', **TINY
    )
    images = jnp.ones((1, 64, 64, 3))
    variables = abstract_variables(model)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    assert jax.eval_shape(model.apply, variables, images).dtype == jnp.float32


def test_bad_inputs_raise_clear_errors():
    model = crossformer_jax.create_model('fpn_crossformer_small', num_classes=3, **TINY)
    for shape, message in [
        ((1, 64, 80, 3), 'multiples of 32, got 64x80'),
        ((1, 64, 64, 1), '3 channels'),
        ((64, 64, 3), 'rank 4'),
    ]:
        with pytest.raises(ValueError, match=message):
            jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))
    with pytest.raises(ValueError, match=r"unknown override\(s\) \['aux_channels'\]"):
        crossformer_jax.create_model('fpn_crossformer_small', num_classes=3, aux_channels=64)
    with pytest.raises(ValueError, match=r"unknown override\(s\) \['neck_channels'\]"):
        crossformer_jax.create_model('upernet_crossformer_small', num_classes=3, neck_channels=9)
    with pytest.raises(ValueError, match='features_only does not apply'):
        crossformer_jax.create_model('upernet_crossformer_small', features_only=True)
    with pytest.raises(ValueError, match='num_classes must be a positive integer, got 0'):
        crossformer_jax.create_model('upernet_crossformer_small', num_classes=0)
    with pytest.raises(ValueError, match='unknown model'):
        crossformer_jax.create_model('upernet_crossformer_tiny', num_classes=3)


def test_dropout2d_drops_whole_channels_in_training_only():
    rng = np.random.default_rng(0)
    features = [
        rng.standard_normal((2, 8 // 2**i, 8 // 2**i, 6)).astype(np.float32) for i in range(4)
    ]
    head = S.FPNHead(num_classes=3, channels=16)
    variables = jax.eval_shape(lambda x: head.init(jax.random.key(0), x, False), features)
    variables = jax.tree.map(lambda leaf: jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape)), variables)

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def dropout_output(rate, train):
        """What cls_seg's Dropout2d hands to conv_seg: (N, H/4, W/4, C)."""
        _, state = head.clone(dropout_rate=rate).apply(
            variables,
            features,
            train,
            rngs={'dropout': jax.random.key(3)},
            mutable=['batch_stats', 'intermediates'],
            capture_intermediates=lambda module, _: isinstance(module, nn.Dropout),
        )
        (out,) = jax.tree.leaves(state['intermediates'])
        return out

    dropped_out, plain = (
        np.asarray(dropout_output(0.5, True)),
        np.asarray(dropout_output(0.0, True)),
    )
    assert np.all(np.any(plain != 0, axis=(1, 2)))
    # Each (example, channel) map is either all zero or all scaled by 1 / (1 - rate).
    dropped = np.all(dropped_out == 0, axis=(1, 2))
    kept = np.all(np.isclose(dropped_out, 2 * plain, rtol=1e-5, atol=1e-6), axis=(1, 2))
    assert np.all(dropped | kept) and dropped.any() and kept.any()
    np.testing.assert_array_equal(dropout_output(0.5, False), dropout_output(0.0, False))


# -------------------------------------------------------------------------------------------------
# BatchNorm.


def test_batch_norm_matches_torch_in_training_and_evaluation():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 4, 6)).astype(np.float32) * 2 + 1
    torch_bn = torch.nn.BatchNorm2d(6)  # momentum 0.1, eps 1e-5
    with torch.no_grad():
        torch_bn.weight.copy_(torch.from_numpy(rng.standard_normal(6).astype(np.float32)))
        torch_bn.bias.copy_(torch.from_numpy(rng.standard_normal(6).astype(np.float32)))
        torch_bn.running_mean.copy_(torch.from_numpy(rng.standard_normal(6).astype(np.float32)))
        torch_bn.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2, 6).astype(np.float32)))
    variables = {
        'params': {
            'scale': torch_bn.weight.detach().numpy(),
            'bias': torch_bn.bias.detach().numpy(),
        },
        'batch_stats': {
            'mean': torch_bn.running_mean.numpy().copy(),
            'var': torch_bn.running_var.numpy().copy(),
        },
    }
    bn = S.BatchNorm()
    x_nchw = torch.from_numpy(x.transpose(0, 3, 1, 2))

    eval_out = bn.apply(variables, x, train=False)
    torch_bn.eval()
    np.testing.assert_allclose(
        eval_out, torch_bn(x_nchw).detach().numpy().transpose(0, 2, 3, 1), atol=1e-5
    )

    train_out, updates = bn.apply(variables, x, train=True, mutable=['batch_stats'])
    torch_bn.train()
    reference = torch_bn(x_nchw).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(train_out, reference, atol=1e-5)
    # Running variance updated with the unbiased batch variance, as PyTorch does.
    np.testing.assert_allclose(updates['batch_stats']['mean'], torch_bn.running_mean, rtol=1e-5)
    np.testing.assert_allclose(updates['batch_stats']['var'], torch_bn.running_var, rtol=1e-5)


def test_global_batch_statistics_over_a_sharded_batch():
    """Batch statistics of a batch sharded over 2 devices equal those of the whole batch (SyncBN)
    without any axis_name: under jit the sharded batch is one global array."""
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from crossformer_jax.models.segmentation import UPerHead
        assert jax.device_count() == 2, jax.devices()
        head = UPerHead(num_classes=3, channels=8)
        # The two halves of the batch differ, so per-device statistics would not be global ones.
        rng = np.random.default_rng(0)
        features = [
            np.concatenate([rng.normal(0, 1, (2, 16 // 2**i, 16 // 2**i, 4 * 2**i)),
                            rng.normal(3, 2, (2, 16 // 2**i, 16 // 2**i, 4 * 2**i))]
                           ).astype(np.float32)
            for i in range(4)
        ]
        shapes = jax.eval_shape(lambda x: head.init(jax.random.key(0), x, False), features)
        variables = jax.tree.map(
            lambda leaf: jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32), shapes)
        step = jax.jit(lambda v, x: head.apply(v, x, True, rngs={'dropout': jax.random.key(1)},
                                               mutable=['batch_stats']))
        whole, whole_stats = step(variables, features)
        mesh = Mesh(np.array(jax.devices()), ('data',))
        sharded = jax.device_put(features, NamedSharding(mesh, P('data')))
        replicated = jax.device_put(variables, NamedSharding(mesh, P()))
        split, split_stats = step(replicated, sharded)
        assert len(split.sharding.device_set) == 2
        np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-5)
        for a, b in zip(jax.tree.leaves(split_stats), jax.tree.leaves(whole_stats)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        # Statistics of one half alone differ: the check can tell local from global statistics.
        _, half_stats = step(variables, [f[:2] for f in features])
        assert any(not np.allclose(a, b, rtol=1e-3)
                   for a, b in zip(jax.tree.leaves(half_stats), jax.tree.leaves(whole_stats)))
        print('ok')
        """
    )
    env = dict(os.environ)
    env['XLA_FLAGS'] = (
        env.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=2'
    ).strip()
    env['JAX_PLATFORMS'] = 'cpu'
    env['PYTHONPATH'] = REPO
    result = subprocess.run(
        [sys.executable, '-c', script],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith('ok'), result.stderr[-3000:]


# -------------------------------------------------------------------------------------------------
# Resampling and pooling against PyTorch.


@pytest.mark.parametrize(
    'in_size, out_size',
    [
        ((2, 3), (4, 6)),
        ((3, 5), (12, 20)),
        ((16, 24), (64, 96)),
        ((12, 20), (5, 7)),
        ((1, 1), (6, 9)),
        ((7, 9), (7, 4)),
    ],
)
def test_resize_bilinear_matches_torch_interpolate(in_size, out_size):
    x = np.random.default_rng(0).standard_normal((2, *in_size, 3)).astype(np.float32)
    reference = (
        F.interpolate(
            torch.from_numpy(x.transpose(0, 3, 1, 2)),
            size=out_size,
            mode='bilinear',
            align_corners=False,
        )
        .numpy()
        .transpose(0, 2, 3, 1)
    )
    ours = np.asarray(S.resize_bilinear(jnp.asarray(x), out_size))
    np.testing.assert_allclose(ours, reference, atol=1e-6)
    # jax.image.resize without antialiasing computes the same interpolation.
    shape = (2, *out_size, 3)
    jax_resize = jax.image.resize(jnp.asarray(x), shape, 'bilinear', antialias=False)
    np.testing.assert_allclose(jax_resize, reference, atol=1e-5)


def test_resize_bilinear_by_scale_factor_two_matches_torch_upsample():
    x = np.random.default_rng(1).standard_normal((1, 5, 3, 2)).astype(np.float32)
    reference = (
        F.interpolate(
            torch.from_numpy(x.transpose(0, 3, 1, 2)),
            scale_factor=2,
            mode='bilinear',
            align_corners=False,
        )
        .numpy()
        .transpose(0, 2, 3, 1)
    )
    np.testing.assert_allclose(S.resize_bilinear(jnp.asarray(x), (10, 6)), reference, atol=1e-6)


@pytest.mark.parametrize(
    'in_size, out_size', [((2, 3), (4, 6)), ((5, 7), (11, 13)), ((8, 6), (3, 4))]
)
def test_resize_nearest_matches_torch_interpolate(in_size, out_size):
    x = np.random.default_rng(0).standard_normal((1, *in_size, 2)).astype(np.float32)
    reference = (
        F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=out_size, mode='nearest')
        .numpy()
        .transpose(0, 2, 3, 1)
    )
    np.testing.assert_array_equal(S.resize_nearest(jnp.asarray(x), out_size), reference)


@pytest.mark.parametrize('size', [(12, 20), (16, 16), (2, 2), (7, 11)])
@pytest.mark.parametrize('bins', [1, 2, 3, 6])
def test_adaptive_avg_pool_matches_torch_for_uneven_bins(size, bins):
    x = np.random.default_rng(0).standard_normal((2, *size, 3)).astype(np.float32)
    reference = F.adaptive_avg_pool2d(torch.from_numpy(x.transpose(0, 3, 1, 2)), bins)
    np.testing.assert_allclose(
        S.adaptive_avg_pool(jnp.asarray(x), bins),
        reference.numpy().transpose(0, 2, 3, 1),
        atol=1e-6,
    )


# -------------------------------------------------------------------------------------------------
# Complexity report.


def _conv_macs_in_jaxpr(jaxpr) -> int:
    """MACs of every convolution in a (closed) jaxpr, nested calls included."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == 'conv_general_dilated':
            rhs = eqn.invars[1].aval
            out = eqn.outvars[0].aval
            dims = eqn.params['dimension_numbers']
            kernel = rhs.shape
            out_channels = kernel[dims.rhs_spec[0]]
            per_output = math.prod(kernel) // out_channels  # kh * kw * in / groups
            total += math.prod(out.shape) * per_output
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += _conv_macs_in_jaxpr(sub)
    return total


@pytest.mark.parametrize('name', ['upernet_crossformer_small', 'fpn_crossformer_pp_small'])
def test_head_macs_equal_the_convolutions_the_model_runs(name):
    from crossformer_jax.models.complexity import count_macs, count_segmentation_macs

    size = (64, 96)
    model = crossformer_jax.create_model(name, num_classes=11, **TINY)
    features = [
        jax.ShapeDtypeStruct(
            (1, size[0] // 2 ** (s + 2), size[1] // 2 ** (s + 2), 16 * 2**s), jnp.float32
        )
        for s in range(4)
    ]
    variables = abstract_variables(model)
    if name.startswith('upernet'):
        head = S.UPerHead(11, 32)
        head_variables = {k: v['decode_head'] for k, v in variables.items()}
        jaxpr = jax.make_jaxpr(lambda v, x: head.apply(v, x, False))(head_variables, features)
    else:
        neck, head = S.FPNNeck(256), S.FPNHead(11, 32)
        neck_variables = {'params': variables['params']['neck']}
        head_variables = {k: v['decode_head'] for k, v in variables.items()}
        jaxpr = jax.make_jaxpr(lambda n, v, x: head.apply(v, neck.apply(n, x), False))(
            neck_variables, head_variables, features
        )
    backbone = count_macs(
        'crossformer_small',
        size,
        features_only=True,
        **{
            k: getattr(model, k)
            for k in ('embed_dim', 'depths', 'num_heads', 'group_size', 'interval', 'version')
        },
    )
    assert count_segmentation_macs(name, size, 11, **TINY) - backbone == _conv_macs_in_jaxpr(
        jaxpr.jaxpr
    )
