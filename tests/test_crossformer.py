"""Unit tests of the Flax model: registry, sizes, grouping rules, DPB indexing, modes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from published_figures import PUBLISHED_GMACS, PUBLISHED_PARAM_COUNTS

import crossformer_jax
from crossformer_jax.models.complexity import count_macs, count_params
from crossformer_jax.models.crossformer import (
    MASKED_LOGIT,
    VARIANTS,
    GroupLayout,
    group_layout,
    group_tokens,
    padding_key_bias,
    relative_offsets,
    ungroup_tokens,
)

TINY = dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8))


def jitted(model):
    """model.apply compiled (eager Flax dispatches op by op and is slow on CPU)."""
    return jax.jit(model.apply, static_argnames='train')


def test_registry_lists_the_eight_variants():
    # Classifiers first; the segmentation models (tests/test_segmentation_models.py) follow.
    assert crossformer_jax.list_models()[: len(PUBLISHED_PARAM_COUNTS)] == sorted(
        PUBLISHED_PARAM_COUNTS
    )


@pytest.mark.parametrize('name', sorted(PUBLISHED_PARAM_COUNTS))
def test_parameter_count_matches_published(name):
    assert count_params(name) == PUBLISHED_PARAM_COUNTS[name]


# The published figures count the same multiply-accumulates as `count_macs` for v1 (within
# 0.12%); for ++ they differ by up to 1.9% (crossformer_pp_huge), so ++ gets a wider bound.
MAC_TOLERANCE = {'v1': 0.005, 'pp': 0.025}


@pytest.mark.parametrize('name', sorted(PUBLISHED_GMACS))
def test_macs_match_the_published_figures(name):
    gmacs = count_macs(name, 224) / 1e9
    tolerance = MAC_TOLERANCE[VARIANTS[name]['version']]
    assert abs(gmacs - PUBLISHED_GMACS[name]) / PUBLISHED_GMACS[name] < tolerance, gmacs


def test_backbone_drops_head_and_final_norm():
    full = count_params('crossformer_tiny')
    backbone = count_params('crossformer_tiny', features_only=True)
    assert full - backbone == 512 * 1000 + 1000 + 2 * 512


@pytest.mark.parametrize(
    'version,size,long_distance,expected',
    [
        # At 224 (56, 28, 14, 7 tokens) with G=7: v1 SDA windows, v1 LDA one region of 7x7 groups,
        # and the 7x7 last stage is global attention.
        ('v1', (56, 56), False, GroupLayout((7, 7), 1, (56, 56))),
        ('v1', (56, 56), True, GroupLayout((7, 7), 8, (56, 56))),
        ('v1', (7, 7), True, GroupLayout((7, 7), 1, (7, 7))),
        # v1 at non-224 sizes: LDA keeps the interval and grows the group; small maps group by the
        # short side and pad the long one.
        ('v1', (24, 14), True, GroupLayout((12, 7), 2, (24, 14))),
        ('v1', (12, 7), False, GroupLayout((7, 7), 1, (14, 7))),
        ('v1', (64, 80), False, GroupLayout((7, 7), 1, (70, 84))),
        # ++ keeps G and I and tiles regions of G*I; small maps become one padded group.
        ('pp', (56, 56), True, GroupLayout((4, 4), 4, (64, 64))),
        ('pp', (56, 56), False, GroupLayout((4, 4), 1, (56, 56))),
        ('pp', (12, 7), False, GroupLayout((12, 12), 1, (12, 12))),
    ],
)
def test_group_layout_follows_the_grouping_rules(version, size, long_distance, expected):
    group_size = 4 if version == 'pp' and size == (56, 56) else 7
    interval = {56: 8 if version == 'v1' else 4, 24: 2}.get(size[0], 1)
    layout = group_layout(
        *size,
        group_size=group_size,
        interval=interval,
        long_distance=long_distance,
        version=version,
    )
    assert layout == expected


def test_lda_group_members_are_interval_apart():
    layout = GroupLayout((2, 3), 2, (8, 12))  # 2 regions of 4x6 per axis... (8/4, 12/6)
    grid = np.arange(8 * 12).reshape(1, 8, 12, 1)
    groups = np.asarray(group_tokens(grid, layout))[0, :, :, 0]
    assert groups.shape == (2 * 2 * 2 * 2, 6)
    # Group 0: region (0, 0), offset (0, 0): rows 0, 2 and columns 0, 2, 4, row-major.
    np.testing.assert_array_equal(groups[0], [0, 2, 4, 24, 26, 28])
    # Group 1: same region, offset (0, 1).
    np.testing.assert_array_equal(groups[1], [1, 3, 5, 25, 27, 29])
    # Every token appears exactly once, and ungrouping restores the grid.
    np.testing.assert_array_equal(np.sort(groups.ravel()), np.arange(96))
    np.testing.assert_array_equal(
        np.asarray(ungroup_tokens(group_tokens(grid, layout), layout)), grid
    )


def test_sda_groups_are_contiguous_windows():
    layout = GroupLayout((2, 2), 1, (4, 4))
    grid = np.arange(16).reshape(1, 4, 4, 1)
    groups = np.asarray(group_tokens(grid, layout))[0, :, :, 0]
    np.testing.assert_array_equal(
        groups, [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    )


def test_relative_offsets_and_index():
    offsets, index = relative_offsets(2, 3)
    assert offsets.shape == (3 * 5, 2)
    np.testing.assert_array_equal(
        offsets[:6], [[-1, -2], [-1, -1], [-1, 0], [-1, 1], [-1, 2], [0, -2]]
    )
    # query (1, 2) -> token 5, key (0, 0) -> token 0: offset (1, 2) -> row (1+1)*5 + (2+2) = 14.
    assert index[5, 0] == 14
    np.testing.assert_array_equal(offsets[index[5, 0]], [1, 2])
    for p in range(6):
        for q in range(6):
            np.testing.assert_array_equal(offsets[index[p, q]], [p // 3 - q // 3, p % 3 - q % 3])


def test_padding_key_bias_masks_only_padded_keys():
    assert padding_key_bias(14, 14, GroupLayout((7, 7), 1, (14, 14))) is None
    layout = GroupLayout((7, 7), 1, (14, 7))
    bias = padding_key_bias(12, 7, layout)
    assert bias.shape == (2, 49)
    assert (bias[0] == 0).all()
    assert (bias[1, :35] == 0).all() and (bias[1, 35:] == MASKED_LOGIT).all()


@pytest.fixture(scope='module')
def tiny_variables():
    model = crossformer_jax.create_model('crossformer_tiny', num_classes=10, **TINY)
    return jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


def test_one_set_of_weights_serves_any_multiple_of_32(tiny_variables):
    backbone = crossformer_jax.create_model('crossformer_tiny', features_only=True, **TINY)
    params = {k: v for k, v in tiny_variables['params'].items() if k not in ('norm', 'head')}
    for h, w in [(64, 64), (96, 160), (224, 224), (256, 320)]:
        maps = jitted(backbone)({'params': params}, jnp.ones((2, h, w, 3)))
        assert [m.shape for m in maps] == [
            (2, h // 4, w // 4, 32),
            (2, h // 8, w // 8, 64),
            (2, h // 16, w // 16, 128),
            (2, h // 32, w // 32, 256),
        ]
        assert all(bool(jnp.isfinite(m).all()) for m in maps)


def test_training_mode_is_stochastic_and_eval_is_deterministic(tiny_variables):
    model = crossformer_jax.create_model(
        'crossformer_tiny', num_classes=10, drop_path_rate=0.5, dropout_rate=0.1, **TINY
    )
    x = jax.random.normal(jax.random.key(1), (4, 64, 64, 3))
    apply = jitted(model)
    eval_a = apply(tiny_variables, x)
    np.testing.assert_array_equal(eval_a, apply(tiny_variables, x, train=False))
    train_a = apply(tiny_variables, x, train=True, rngs={'dropout': jax.random.key(2)})
    train_b = apply(tiny_variables, x, train=True, rngs={'dropout': jax.random.key(3)})
    assert float(jnp.abs(train_a - train_b).max()) > 1e-3
    assert float(jnp.abs(train_a - eval_a).max()) > 1e-3


def test_bfloat16_compute_keeps_float32_params_and_logits(tiny_variables):
    model = crossformer_jax.create_model(
        'crossformer_tiny', num_classes=10, dtype='bfloat16', remat=True, **TINY
    )
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))['params']
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype('float32')}
    x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    logits = jitted(model)(tiny_variables, x)
    reference = jitted(crossformer_jax.create_model('crossformer_tiny', num_classes=10, **TINY))(
        tiny_variables, x
    )
    assert logits.dtype == jnp.float32
    scale = float(jnp.abs(reference).max())
    np.testing.assert_allclose(logits, reference, atol=0.1 * scale)
    # Computed in bfloat16 (8-bit mantissa), not float32 with a cast at the end.
    assert float(jnp.abs(logits - reference).max()) > 1e-4 * scale

    # The matmuls themselves take bfloat16 operands.
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x))(tiny_variables, x)
    dots = [e for e in _all_equations(jaxpr.jaxpr) if e.primitive.name == 'dot_general']
    bf16 = [e for e in dots if all(v.aval.dtype == jnp.bfloat16 for v in e.invars)]
    # All but the four f32 DPB matmuls of each block take bfloat16 operands.
    assert len(dots) > 0 and len(bf16) >= len(dots) // 2, (len(bf16), len(dots))


def _all_equations(jaxpr):
    """Every equation of a jaxpr, inside sub-jaxprs (pjit, remat, custom_vjp) too."""
    for equation in jaxpr.eqns:
        yield equation
        for value in equation.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, 'jaxpr', sub)
                if hasattr(inner, 'eqns'):
                    yield from _all_equations(inner)


def test_remat_gives_the_same_gradients(tiny_variables):
    x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    weights = jax.random.normal(jax.random.key(2), (2, 10))
    grads = {}
    for remat in (False, True):
        model = crossformer_jax.create_model(
            'crossformer_tiny', num_classes=10, remat=remat, **TINY
        )
        loss = lambda p, model=model: jnp.sum(model.apply({'params': p}, x) * weights)  # noqa: E731
        grads[remat] = jax.jit(jax.grad(loss))(tiny_variables['params'])
    flat = jax.tree_util.tree_leaves_with_path(grads[False])
    scale = max(float(jnp.abs(g).max()) for _, g in flat)
    for (path, plain), rematerialised in zip(flat, jax.tree.leaves(grads[True])):
        np.testing.assert_allclose(
            rematerialised, plain, rtol=0, atol=1e-6 * scale, err_msg=str(path)
        )


def test_initialisation_statistics(tiny_variables):
    """Linear kernels: N(0, 0.02) cut at +-2 std (std 0.02 * 0.8796); conv kernels and biases:
    U(+-1/sqrt(fan_in)) (std bound/sqrt 3); Linear biases 0; LayerNorm 1 and 0."""
    flat = {'/'.join(k): np.asarray(v) for k, v in flatten_dict(tiny_variables['params']).items()}
    linear = np.concatenate(
        [v.ravel() for k, v in flat.items() if k.endswith('kernel') and v.ndim == 2]
    )
    assert abs(linear.std() / (0.02 * 0.8796) - 1) < 0.02, linear.std()
    assert abs(linear.mean()) < 1e-3 and np.abs(linear).max() <= 0.04
    assert np.abs(linear).max() > 0.039  # cut at 2 std, not narrower
    for key, value in flat.items():
        if not key.endswith('kernel'):
            continue
        bias = flat[key[: -len('kernel')] + 'bias']
        if value.ndim == 2:
            assert np.all(bias == 0), key
            continue
        bound = 1 / np.sqrt(np.prod(value.shape[:3]))  # (kh, kw, in / groups, out)
        assert np.abs(value).max() <= bound, key
        if value.size >= 4096:
            assert abs(value.std() / (bound / np.sqrt(3)) - 1) < 0.05, (key, value.std())
        assert np.abs(bias).max() <= bound and np.abs(bias).max() > 0.5 * bound, key
    scales = [k for k in flat if k.endswith('scale')]
    assert len(scales) > 10
    for key in scales:
        assert np.all(flat[key] == 1) and np.all(flat[key[: -len('scale')] + 'bias'] == 0), key


@pytest.mark.parametrize(
    'shape,message',
    [
        ((64, 64, 3), 'rank 4'),
        ((1, 64, 64, 1), '3 channels'),
        ((1, 3, 64, 64), '3 channels'),
        ((1, 48, 64, 3), 'multiples of 32'),
        ((1, 64, 100, 3), 'multiples of 32'),
    ],
)
def test_bad_inputs_raise_value_error(tiny_variables, shape, message):
    model = crossformer_jax.create_model('crossformer_tiny', num_classes=10, **TINY)
    with pytest.raises(ValueError, match=message):
        jitted(model)(tiny_variables, jnp.zeros(shape))


def test_create_model_rejects_unknown_names_and_overrides():
    with pytest.raises(ValueError, match='unknown model .*crossformer_tiny'):
        crossformer_jax.create_model('crossformer_giant')
    with pytest.raises(ValueError, match='unknown override'):
        crossformer_jax.create_model('crossformer_tiny', window_size=7)
    with pytest.raises(ValueError, match='4 entries'):
        crossformer_jax.create_model('crossformer_tiny', depths=(1, 1, 1))
