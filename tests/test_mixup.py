"""Tests of on-device Mixup / CutMix with label smoothing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from crossformer_jax.augment.mixup import mix_batch, smooth_one_hot

NUM_CLASSES = 10
LS = 0.1
ON, OFF = 1 - LS + LS / NUM_CLASSES, LS / NUM_CLASSES  # 0.91, 0.01


@functools.cache
def _mixer(mixup_alpha, cutmix_alpha):
    """One jitted function per configuration, shared by the tests (compiles are slow)."""
    return jax.jit(
        functools.partial(
            mix_batch,
            num_classes=NUM_CLASSES,
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
            switch_prob=0.5,
            label_smoothing=LS,
            return_lam=True,
        )
    )


def _batch(seed=0):
    rng = np.random.RandomState(seed)
    images = rng.randn(4, 8, 12, 3).astype(np.float32)
    labels = rng.permutation(NUM_CLASSES)[:4].astype(np.int32)  # distinct labels
    return jnp.asarray(images), jnp.asarray(labels)


def _binary_batch():
    """Sample 0 all zeros, sample 3 (its partner in x[::-1]) all ones."""
    images = np.zeros((4, 8, 12, 3), np.float32)
    images[1], images[2], images[3] = 0.25, 0.75, 1.0
    return jnp.asarray(images), jnp.asarray([0, 1, 2, 3], jnp.int32)


def test_label_smoothing_only_is_exact():
    images, labels = _batch()
    out, targets = mix_batch(
        jax.random.PRNGKey(0),
        images,
        labels,
        num_classes=NUM_CLASSES,
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
        label_smoothing=LS,
    )
    np.testing.assert_array_equal(np.asarray(out), np.asarray(images))
    expected = np.full((4, NUM_CLASSES), 0.01, np.float32)
    expected[np.arange(4), np.asarray(labels)] = 0.91
    np.testing.assert_allclose(np.asarray(targets), expected, rtol=0, atol=1e-7)
    np.testing.assert_allclose(
        np.asarray(smooth_one_hot(labels, NUM_CLASSES, LS)), expected, atol=1e-7
    )


@pytest.mark.parametrize('mixup_alpha,cutmix_alpha', [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0)])
def test_targets_sum_to_one_and_match_lam(mixup_alpha, cutmix_alpha):
    images, labels = _batch()
    fn = _mixer(mixup_alpha, cutmix_alpha)
    y = np.asarray(labels)
    for i in range(6):
        out, targets, lam = fn(jax.random.PRNGKey(i), images, labels)
        assert out.shape == images.shape and out.dtype == images.dtype
        assert targets.shape == (4, NUM_CLASSES) and targets.dtype == jnp.float32
        t, lam = np.asarray(targets), float(lam)
        np.testing.assert_allclose(t.sum(-1), 1.0, atol=1e-6)
        assert 0.0 <= lam <= 1.0
        # own label: lam * 0.91 + (1 - lam) * 0.01; the partner's label the other way round
        np.testing.assert_allclose(t[np.arange(4), y], lam * ON + (1 - lam) * OFF, atol=1e-6)
        np.testing.assert_allclose(t[np.arange(4), y[::-1]], (1 - lam) * ON + lam * OFF, atol=1e-6)
        others = np.ones_like(t, bool)
        others[np.arange(4), y] = others[np.arange(4), y[::-1]] = False
        np.testing.assert_allclose(t[others], OFF, atol=1e-7)


def test_mixup_blends_with_reversed_batch():
    images, labels = _batch()
    for i in range(3):
        out, _, lam = _mixer(0.8, 0.0)(jax.random.PRNGKey(i), images, labels)
        expected = lam * images + (1 - lam) * images[::-1]
        np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-6, atol=1e-6)


def test_cutmix_pixel_fraction_equals_lam():
    images, labels = _binary_batch()
    seen_partial = False
    for i in range(10):
        out, targets, lam = _mixer(0.0, 1.0)(jax.random.PRNGKey(i), images, labels)
        out, lam = np.asarray(out), float(lam)
        assert set(np.unique(out[0])) <= {0.0, 1.0}  # pixels are copied, never blended
        np.testing.assert_allclose(1.0 - out[0].mean(), lam, atol=1e-6)  # kept fraction
        np.testing.assert_allclose(out[3].mean(), lam, atol=1e-6)
        np.testing.assert_allclose(
            np.asarray(targets)[0, [0, 3]],
            [lam * ON + (1 - lam) * OFF, (1 - lam) * ON + lam * OFF],
            atol=1e-6,
        )
        rows, cols = np.nonzero(out[0, :, :, 0])
        if rows.size:  # the pasted region is one axis-aligned box
            assert out[0, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].min() == 1.0
            seen_partial = seen_partial or rows.size < out.shape[1] * out.shape[2]
    assert seen_partial


def test_switches_between_mixup_and_cutmix_and_is_deterministic():
    images, labels = _binary_batch()
    fn = _mixer(0.8, 1.0)
    kinds = []
    for i in range(30):
        out, _, lam = fn(jax.random.PRNGKey(i), images, labels)
        if set(np.unique(np.asarray(out[0]))) <= {0.0, 1.0}:
            kinds.append('cutmix')
        else:
            kinds.append('mixup')
            np.testing.assert_allclose(np.asarray(out[0]), 1.0 - float(lam), atol=1e-6)
        out2, _, _ = fn(jax.random.PRNGKey(i), images, labels)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(out2))
    assert 5 <= kinds.count('cutmix') <= 25


def test_bfloat16_images_keep_dtype():
    images, labels = _batch()
    fn = functools.partial(mix_batch, num_classes=NUM_CLASSES)
    out, targets = jax.eval_shape(fn, jax.random.PRNGKey(0), images.astype(jnp.bfloat16), labels)
    assert out.dtype == jnp.bfloat16 and out.shape == images.shape
    assert targets.dtype == jnp.float32 and targets.shape == (4, NUM_CLASSES)


@pytest.mark.parametrize('alpha', [0.8, 0.2])
def test_lam_distribution_matches_beta(alpha):
    """lam for Mixup alone is Beta(alpha, alpha): Kolmogorov-Smirnov over 400 draws.

    With 400 draws the test rejects a distribution whose CDF is 0.1 away from Beta(alpha, alpha)
    anywhere (e.g. Beta(1, 1) for alpha 0.8, or lam folded to max(lam, 1 - lam)); the seeds are
    fixed, so the outcome is the same on every run.
    """
    images, labels = _batch()
    fn = _mixer(alpha, 0.0)
    lams = np.array(
        [float(fn(jax.random.PRNGKey(1000 + i), images, labels)[2]) for i in range(400)]
    )
    assert scipy.stats.kstest(lams, scipy.stats.beta(alpha, alpha).cdf).pvalue > 0.01
    # The same test tells Beta(alpha, alpha) from its neighbours, so it is not vacuous.
    assert scipy.stats.kstest(lams, scipy.stats.beta(2 * alpha, 2 * alpha).cdf).pvalue < 0.01
    assert (
        scipy.stats.kstest(np.maximum(lams, 1 - lams), scipy.stats.beta(alpha, alpha).cdf).pvalue
        < 0.01
    )
