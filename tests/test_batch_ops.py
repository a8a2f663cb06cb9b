"""Tests of the on-device RandAugment, normalisation and random erasing (batch_ops)."""

import jax
import ml_collections
import numpy as np
import pytest

from crossformer_jax.augment import batch_ops, randaugment

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_normalize_numbers():
    img = np.array([[[[0, 0, 0], [255, 255, 255], [51, 102, 204]]]], np.uint8)
    out = np.asarray(batch_ops.normalize(img, MEAN, STD))
    assert out.dtype == np.float32 and out.shape == img.shape
    expected = (img.astype(np.float64) / 255.0 - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        out[0, 0, 1], [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225], rtol=1e-6
    )


def _boxes(out, base):
    """Per example: the erased fraction (checking the erased pixels form one box)."""
    fractions = []
    for image in out:
        changed = np.any(image != base[0], axis=-1)
        rows, cols = np.nonzero(changed)
        if rows.size == 0:
            fractions.append(0.0)
            continue
        box = np.zeros_like(changed)
        box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
        np.testing.assert_array_equal(changed, box)  # one axis-aligned box
        fractions.append(changed.mean())
    return np.asarray(fractions)


def test_random_erasing_box_fraction_noise_and_probability():
    b, h, w = 64, 48, 40
    base = np.full((b, h, w, 3), 100.0, np.float32)  # sentinel value noise never hits
    erase = jax.jit(batch_ops.random_erasing, static_argnames=('prob',))
    key = jax.random.key(3)
    np.testing.assert_array_equal(np.asarray(erase(base, key, prob=0.0)), base)
    out = np.asarray(erase(base, key, prob=1.0))
    fractions = _boxes(out, base)
    assert (fractions > 0).all()
    # area fraction in [0.02, 1/3] up to the rounding of the box sides; boxes differ per example
    assert fractions.min() >= 0.02 * 0.8 and fractions.max() <= (1 / 3) * 1.2
    assert len(set(fractions.round(6))) > b // 2
    noise = out[out != 100.0]
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1.0) < 0.05
    # boxes spread over the whole image (uniform placement)
    covered = np.any(out != base, axis=-1).mean(axis=0)
    assert covered[0].max() > 0 and covered[-1].max() > 0 and covered[:, 0].max() > 0
    # each example erased with probability 0.25, independently
    applied = np.concatenate(
        [_boxes(np.asarray(erase(base, jax.random.key(i), prob=0.25)), base) > 0 for i in range(4)]
    )
    assert 40 <= applied.sum() <= 90  # 256 draws, expected 64


def test_random_erasing_is_a_function_of_the_key_and_example_index():
    base = np.zeros((6, 16, 16, 3), np.float32)
    key = jax.random.key(11)
    erase = jax.jit(lambda x, k: batch_ops.random_erasing(x, k, prob=1.0))
    a = np.asarray(erase(base, key))
    np.testing.assert_array_equal(a, np.asarray(erase(base, key)))
    # example i depends only on (key, i): a shorter batch erases its examples the same way
    np.testing.assert_array_equal(a[:3], np.asarray(erase(base[:3], key)))
    other = np.asarray(erase(base, jax.random.key(12)))
    assert not np.array_equal(a, other)


def test_train_and_eval_images_read_the_data_config():
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (4, 8, 8, 3)).astype(np.uint8)
    cfg = ml_collections.ConfigDict(
        {
            'mean': (0.5, 0.5, 0.5),
            'std': (0.25, 0.25, 0.25),
            'random_erasing_prob': 0.0,
            'randaugment': '',
        }
    )
    expected = (images / 255.0 - 0.5) / 0.25
    key = jax.random.key(0)
    np.testing.assert_allclose(batch_ops.train_images(images, key, cfg), expected, atol=1e-6)
    np.testing.assert_allclose(batch_ops.eval_images(images, cfg), expected, atol=1e-6)
    cfg.random_erasing_prob = 1.0
    erased = np.asarray(jax.jit(lambda x, k: batch_ops.train_images(x, k, cfg))(images, key))
    assert erased.dtype == np.float32 and (erased != expected).any(axis=(1, 2, 3)).all()
    # RandAugment first, on the uint8 pixels, from fold_in(key, 0); fill round(255 * mean)
    cfg.random_erasing_prob = 0.0
    cfg.randaugment = 'rand-n3-m9-p1'
    augmented = randaugment.randaugment(
        images, jax.random.fold_in(key, 0), 'rand-n3-m9-p1', fill=(128, 128, 128)
    )
    assert not np.array_equal(augmented, images)
    np.testing.assert_allclose(
        batch_ops.train_images(images, key, cfg), (augmented / 255.0 - 0.5) / 0.25, atol=1e-6
    )
    assert batch_ops.randaugment_fill(cfg) == (128.0, 128.0, 128.0)
    cfg.randaugment_fill = (0, 10, 20)
    assert batch_ops.randaugment_fill(cfg) == (0.0, 10.0, 20.0)
    cfg.randaugment_fill = (0, 10)
    with pytest.raises(ValueError, match='randaugment_fill must be 3 values'):
        batch_ops.randaugment_fill(cfg)
    cfg.randaugment = 'rand-m9-q3'
    with pytest.raises(ValueError, match="section 'q3'"):
        batch_ops.randaugment_config(cfg)
