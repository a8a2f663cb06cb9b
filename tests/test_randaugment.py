"""Tests of the on-device RandAugment against timm's semantics written with PIL."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_image
from jax.sharding import Mesh
from PIL import Image, ImageEnhance, ImageOps

from crossformer_jax.augment import randaugment as ra

FILL = (128, 128, 128)


def _op(name, image, magnitude, sign=1.0, fill=FILL):
    return np.asarray(ra.randaugment_op(name, image, magnitude, sign, fill))


# ----------------------------------------------------------------------------
# Config


def test_parse_randaugment_recipe_string():
    cfg = ra.parse_randaugment('rand-m9-mstd0.5-inc1')
    assert cfg == ra.RandAugmentConfig(
        num_layers=2,
        magnitude=9.0,
        magnitude_std=0.5,
        magnitude_max=10.0,
        prob=0.5,
        increasing=True,
    )
    assert cfg.ops == (
        'AutoContrast',
        'Equalize',
        'Invert',
        'Rotate',
        'PosterizeIncreasing',
        'SolarizeIncreasing',
        'SolarizeAdd',
        'ColorIncreasing',
        'ContrastIncreasing',
        'BrightnessIncreasing',
        'SharpnessIncreasing',
        'ShearX',
        'ShearY',
        'TranslateXRel',
        'TranslateYRel',
    )
    other = ra.parse_randaugment('rand-n3-m7-p0.8-mmax12-mstdinf')
    assert (other.num_layers, other.magnitude, other.prob, other.magnitude_max) == (
        3,
        7.0,
        0.8,
        12.0,
    )
    assert other.magnitude_std == float('inf') and not other.increasing
    assert other.ops == ra.DEFAULT_OPS
    with pytest.raises(ValueError, match='must start with'):
        ra.parse_randaugment('augmix-m9')
    with pytest.raises(ValueError, match="section 'zz3'"):
        ra.parse_randaugment('rand-m9-zz3')
    with pytest.raises(ValueError, match="Bad value in RandAugment section 'mx'"):
        ra.parse_randaugment('rand-mx')


# ----------------------------------------------------------------------------
# Single ops


@pytest.mark.parametrize('name', ra.ALL_OPS)
def test_each_op_shape_dtype_and_range(name):
    img = random_image(20, 28)
    for magnitude in (0.0, 9.0, 10.0):
        out = _op(name, img, magnitude)
        assert out.shape == img.shape and out.dtype == np.uint8
        out_float = _op(name, img.astype(np.float32), magnitude)
        np.testing.assert_array_equal(out_float, out)
    with pytest.raises(ValueError, match="Unknown RandAugment op 'Blur'"):
        ra.randaugment_op('Blur', img, 5.0)


def test_lookup_table_ops_exact_values():
    img = random_image()
    x = np.array([[[0, 127, 128], [129, 200, 255]]], np.uint8)
    np.testing.assert_array_equal(_op('Invert', img, 5.0), 255 - img)
    # Solarize at magnitude 5: threshold int(256 * 0.5) = 128, values >= 128 inverted
    np.testing.assert_array_equal(_op('Solarize', x, 5.0), [[[0, 127, 127], [126, 55, 0]]])
    np.testing.assert_array_equal(_op('Solarize', x, 10.0), x)  # threshold 256
    np.testing.assert_array_equal(_op('SolarizeIncreasing', x, 10.0), 255 - x)  # threshold 0
    # SolarizeIncreasing at 9: threshold 256 - int(230.4) = 26
    np.testing.assert_array_equal(
        _op('SolarizeIncreasing', img, 9.0), np.where(img >= 26, 255 - img, img)
    )
    # SolarizeAdd at 10: + int(110) below 128
    np.testing.assert_array_equal(_op('SolarizeAdd', x, 10.0), [[[110, 237, 128], [129, 200, 255]]])
    np.testing.assert_array_equal(_op('Posterize', img, 10.0), img & 0xF0)  # int(4 * 1) bits
    np.testing.assert_array_equal(_op('Posterize', img, 0.0), np.zeros_like(img))
    np.testing.assert_array_equal(_op('PosterizeIncreasing', img, 9.0), img & 0x80)  # 4 - 3 bits
    np.testing.assert_array_equal(_op('PosterizeIncreasing', img, 0.0), img & 0xF0)
    const = np.full((5, 6, 3), 77, np.uint8)
    np.testing.assert_array_equal(_op('AutoContrast', const, 5.0), const)
    np.testing.assert_array_equal(_op('Equalize', const, 5.0), const)


def test_table_lookup_and_histograms_equal_the_plain_formulas():
    """The one-hot forms of ``lut[c, image[..., c]]`` and of the per-channel histograms, bit for
    bit, on random images, one holding every value in every channel."""
    rng = np.random.RandomState(0)
    every_value = np.stack([np.arange(256), 255 - np.arange(256), np.arange(256) * 7 % 256], -1)
    images = (
        rng.randint(0, 256, (37, 53, 3)),
        every_value.reshape(16, 16, 3),
        np.minimum(random_image(40, 30, seed=2), 200),  # values above 200 absent
    )
    lookup, histograms = jax.jit(ra.apply_lut), jax.jit(ra._histograms)
    for image in images:
        lut = rng.randint(0, 256, (3, 256))
        expected = lut[np.arange(3), image]
        counts = np.stack([np.bincount(image[..., c].ravel(), minlength=256) for c in range(3)])
        x = image.astype(np.float32)
        np.testing.assert_array_equal(lookup(x, lut.astype(np.float32)), expected)
        np.testing.assert_array_equal(histograms(x), counts)


def test_affine_maps_exactly_on_the_pixel_grid():
    img = random_image(8, 8).astype(np.float32)
    fill = jnp.asarray((1.0, 2.0, 3.0))
    unit = jnp.asarray([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    np.testing.assert_array_equal(ra.affine(img, unit, fill), img)
    quarter = ra._rotation(jnp.asarray(90.0), 8, 8)
    np.testing.assert_array_equal(ra.affine(img, quarter, fill), np.rot90(img))  # anticlockwise
    # translate by +3 in x: output (x, y) reads input (x + 3, y), the content moves left
    out = np.asarray(ra.affine(img, jnp.asarray([1.0, 0.0, 3.0, 0.0, 1.0, 0.0]), fill))
    np.testing.assert_array_equal(out[:, :5], img[:, 3:])
    np.testing.assert_array_equal(out[:, 5:], np.broadcast_to(fill, (8, 3, 3)))
    out = np.asarray(ra.affine(img, jnp.asarray([1.0, 0.0, 0.0, 0.0, 1.0, -2.0]), fill))
    np.testing.assert_array_equal(out[2:], img[:6])
    np.testing.assert_array_equal(out[:2], np.broadcast_to(fill, (2, 8, 3)))
    # half a pixel: the mean of two neighbours, rounded half up
    out = np.asarray(ra.affine(img, jnp.asarray([1.0, 0.0, 0.5, 0.0, 1.0, 0.0]), fill))
    np.testing.assert_array_equal(out[:, :7], np.floor((img[:, :7] + img[:, 1:]) / 2 + 0.5))


# ----------------------------------------------------------------------------
# Every op against its definition written with PIL, magnitude mapping included (timm's
# auto_augment on PIL images; geometric ops sampled bilinearly).


def _solarize_add_lut(addition, threshold=128):
    return [min(255, v + addition) if v < threshold else v for v in range(256)] * 3


def _pil_affine(pil, coefficients):
    return pil.transform(
        pil.size, Image.AFFINE, coefficients, resample=Image.BILINEAR, fillcolor=FILL
    )


def pil_randaugment(name, pil, magnitude, sign):
    """The op `name` at `magnitude` (0..10) written with PIL; `sign` (+-1) for signed ops."""
    level = magnitude / 10
    width, height = pil.size
    enhancers = {
        'Color': ImageEnhance.Color,
        'Contrast': ImageEnhance.Contrast,
        'Brightness': ImageEnhance.Brightness,
        'Sharpness': ImageEnhance.Sharpness,
    }
    if name in enhancers:
        return enhancers[name](pil).enhance(0.1 + 1.8 * level)
    if name.endswith('Increasing') and name[: -len('Increasing')] in enhancers:
        return enhancers[name[: -len('Increasing')]](pil).enhance(1 + sign * 0.9 * level)
    return {
        'AutoContrast': lambda: ImageOps.autocontrast(pil),
        'Equalize': lambda: ImageOps.equalize(pil),
        'Invert': lambda: ImageOps.invert(pil),
        'Rotate': lambda: pil.rotate(sign * 30 * level, resample=Image.BILINEAR, fillcolor=FILL),
        'Posterize': lambda: ImageOps.posterize(pil, int(4 * level)),
        'PosterizeIncreasing': lambda: ImageOps.posterize(pil, 4 - int(4 * level)),
        'Solarize': lambda: ImageOps.solarize(pil, int(256 * level)),
        'SolarizeIncreasing': lambda: ImageOps.solarize(pil, 256 - int(256 * level)),
        'SolarizeAdd': lambda: pil.point(_solarize_add_lut(int(110 * level))),
        'ShearX': lambda: _pil_affine(pil, (1, sign * 0.3 * level, 0, 0, 1, 0)),
        'ShearY': lambda: _pil_affine(pil, (1, 0, 0, sign * 0.3 * level, 1, 0)),
        'TranslateXRel': lambda: _pil_affine(pil, (1, 0, sign * 0.45 * level * width, 0, 1, 0)),
        'TranslateYRel': lambda: _pil_affine(pil, (1, 0, 0, 0, 1, sign * 0.45 * level * height)),
    }[name]()


def _agreement(ours, reference, name):
    """Pixel ops: equal up to rounding (1); geometric ops (PIL samples on a fixed-point grid,
    fill mixed in at the borders): 90% of the values within 2."""
    diff = np.abs(ours.astype(int) - reference.astype(int))
    if name in ra.GEOMETRIC_OPS:
        return np.mean(diff <= 2) >= 0.9
    return diff.max() <= 1


@pytest.mark.parametrize('name', ra.ALL_OPS)
@pytest.mark.parametrize('magnitude', [4.0, 9.0])
def test_randaugment_op_matches_its_pil_definition(name, magnitude):
    # Channels of half range at three offsets (the last up to 255): AutoContrast, Equalize and
    # the highest Solarize threshold (230) all change them.
    img = (random_image(24, 32, seed=5) // 2 + np.array([30, 100, 128])).astype(np.uint8)
    pil = Image.fromarray(img)
    for sign in (1.0, -1.0):
        ours = _op(name, img, magnitude, sign)
        reference = np.asarray(pil_randaugment(name, pil, magnitude, sign))
        assert _agreement(ours, reference, name), (name, sign)
        # The op changes the image at this magnitude: an op that returned its input would fail.
        assert not _agreement(img, reference, name), (name, sign)


def test_pixel_ops_equal_pil_on_a_photo_like_image():
    """Smooth gradients with noise, as in photos. The lookup tables are PIL's exactly; blends
    truncate as PIL does, so only a factor rounded differently (float32 here, a double cast to
    float in PIL) can move a value that lands next to an integer by one."""
    yy, xx = np.mgrid[0:40, 0:56]
    noise = np.random.RandomState(3).randint(-20, 21, (40, 56, 3))
    planes = np.stack([yy * 5, xx * 4, 255 - yy * 3 - xx], -1)
    img = np.clip(planes + noise, 0, 255).astype(np.uint8)
    pil = Image.fromarray(img)
    for name in ('Equalize', 'AutoContrast', 'Invert', 'SolarizeIncreasing', 'SolarizeAdd'):
        reference = np.asarray(pil_randaugment(name, pil, 7.0, 1.0))
        np.testing.assert_array_equal(_op(name, img, 7.0), reference, err_msg=name)
    for name in ('ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing', 'Sharpness'):
        for sign in (1.0, -1.0):
            reference = np.asarray(pil_randaugment(name, pil, 7.0, sign)).astype(int)
            diff = np.abs(_op(name, img, 7.0, sign).astype(int) - reference)
            assert diff.max() <= 1 and np.mean(diff == 0) > 0.999, (name, sign)


# ----------------------------------------------------------------------------
# The batch transform


def test_randaugment_batch_determinism_independence_and_identity():
    images = np.stack([random_image(16, 16, seed=s) for s in range(4)])
    rng = jax.random.PRNGKey(3)
    spec = 'rand-m9-mstd0.5-inc1'
    a = np.asarray(ra.randaugment(images, rng, spec))
    assert a.shape == images.shape and a.dtype == np.float32
    np.testing.assert_array_equal(a, np.floor(a))
    assert a.min() >= 0 and a.max() <= 255
    np.testing.assert_array_equal(a, ra.randaugment(images, rng, spec))
    np.testing.assert_array_equal(
        a, jax.jit(ra.randaugment, static_argnums=2)(images, rng, ra.parse_randaugment(spec))
    )
    # example i draws from fold_in(rng, i) only: changing example 0 leaves the others alone
    changed = images.copy()
    changed[0] = 255 - changed[0]
    np.testing.assert_array_equal(ra.randaugment(changed, rng, spec)[1:], a[1:])
    # the same image at different positions of the batch is augmented differently
    same = np.repeat(images[:1], 8, axis=0)
    outs = {np.asarray(x).tobytes() for x in ra.randaugment(same, rng, spec)}
    assert len(outs) > 3
    np.testing.assert_array_equal(ra.randaugment(images, rng, 'rand-m9-p0'), images)
    # split over a mesh, each device loops over its own examples with the same keys
    mesh = Mesh(np.asarray(jax.devices()[:1]), ('data',))
    np.testing.assert_array_equal(ra.randaugment(images, rng, spec, mesh=mesh), a)


def test_layer_draws_follow_the_recipe():
    """Op uniform over the set, applied with probability p, magnitude N(m, mstd) clipped to
    [0, mmax], sign +-1 with equal odds: timm's RandAugment sampling."""
    config = ra.parse_randaugment('rand-m9-mstd0.5-inc1')
    keys = jax.random.split(jax.random.PRNGKey(0), 20000)
    chosen, magnitude, sign = (
        np.asarray(x) for x in jax.vmap(lambda k: ra._draw_layer(k, config))(keys)
    )
    num_ops = len(config.ops)
    applied = chosen < num_ops
    assert abs(applied.mean() - 0.5) < 0.015
    counts = np.bincount(chosen[applied], minlength=num_ops)
    assert counts.min() > 0.8 * applied.sum() / num_ops
    assert counts.max() < 1.2 * applied.sum() / num_ops
    assert magnitude.min() >= 0.0 and magnitude.max() == 10.0  # clipped at mmax
    assert abs(np.median(magnitude) - 9.0) < 0.02
    # 9 + 0.5 N(0, 1) > 10 with probability 1 - Phi(2) = 0.0228
    assert abs(np.mean(magnitude == 10.0) - 0.0228) < 0.005
    assert abs(np.mean(sign == 1.0) - 0.5) < 0.015 and set(np.unique(sign)) == {-1.0, 1.0}
    uniform = ra.parse_randaugment('rand-m6-mstdinf')
    magnitude = np.asarray(jax.vmap(lambda k: ra._draw_layer(k, uniform)[1])(keys))
    assert magnitude.min() >= 0.0 and magnitude.max() <= 6.0
    assert abs(magnitude.mean() - 3.0) < 0.05
