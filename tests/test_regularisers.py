"""The stochastic regularisers keep the expected value of what they drop: stochastic depth, the
attention-probability dropout and the MLP dropout, averaged over many dropout keys, match the
deterministic output (a missing 1 / keep scaling would be off by the keep rate)."""

import jax
import jax.numpy as jnp
import numpy as np

from crossformer_jax.models.crossformer import DropPath, GroupAttention, Mlp

SAMPLES = 4000


def mean_over_keys(apply, samples=SAMPLES):
    """The mean of apply(key) over `samples` dropout keys."""
    keys = jax.random.split(jax.random.key(1), samples)
    return jnp.mean(jax.lax.map(apply, keys, batch_size=500), axis=0)


def test_stochastic_depth_keeps_the_expected_value():
    rate = 0.3
    x = jnp.asarray(np.random.default_rng(0).uniform(0.5, 1.5, (50_000, 1, 1, 2)), jnp.float32)
    module = DropPath(rate)
    out = module.apply({}, x, train=True, rngs={'dropout': jax.random.key(2)})
    kept = np.asarray(out[:, 0, 0, 0] != 0)
    assert abs(kept.mean() - (1 - rate)) < 0.01  # whole samples dropped at the rate
    np.testing.assert_allclose(out[kept], x[kept] / (1 - rate), rtol=1e-6)
    # Mean over samples: 1 +- ~0.002 with the scaling, 0.7 without it.
    assert abs(float(jnp.mean(out / x)) - 1.0) < 0.015
    np.testing.assert_array_equal(module.apply({}, x, train=False), x)


def test_attention_dropout_keeps_the_expected_value():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 2, 4, 8)), jnp.float32)  # (N, groups, T = 2x2, C)
    module = GroupAttention(dim=8, num_heads=2, dropout_rate=0.4)
    variables = module.init(jax.random.key(0), x, (2, 2), None, False)
    deterministic = module.apply(variables, x, (2, 2), None, False)

    def sample(key):
        return module.apply(variables, x, (2, 2), None, True, rngs={'dropout': key})

    one = sample(jax.random.key(3))
    assert not np.allclose(one, deterministic)  # dropout is active in training
    mean = mean_over_keys(sample)
    scale = float(jnp.max(jnp.abs(deterministic)))
    np.testing.assert_allclose(mean, deterministic, atol=0.05 * scale)


def test_mlp_dropout_keeps_the_expected_value():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 8)), jnp.float32)
    module = Mlp(dim=8, hidden_dim=16, dropout_rate=0.3)
    variables = module.init(jax.random.key(0), x, False)
    deterministic = module.apply(variables, x, False)

    def sample(key):
        return module.apply(variables, x, True, rngs={'dropout': key})

    mean = mean_over_keys(sample)
    scale = float(jnp.max(jnp.abs(deterministic)))
    np.testing.assert_allclose(mean, deterministic, atol=0.05 * scale)
