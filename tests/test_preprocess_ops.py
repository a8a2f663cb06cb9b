"""Tests of the TF preprocessing ops (small images, eager mode)."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from crossformer_jax import preprocess_ops as ops

SEED = tf.constant([3, 7], tf.int64)


def _rand_image(h=24, w=32, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8)


def _seed(i):
    return tf.constant([i, 11], tf.int64)


# ----------------------------------------------------------------------------
# RandAugment config


def test_parse_randaugment_recipe_string():
    cfg = ops.parse_randaugment('rand-m9-mstd0.5-inc1')
    assert cfg == ops.RandAugmentConfig(
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
    other = ops.parse_randaugment('rand-n3-m7-p0.8-mmax12-mstdinf')
    assert (other.num_layers, other.magnitude, other.prob, other.magnitude_max) == (
        3,
        7.0,
        0.8,
        12.0,
    )
    assert other.magnitude_std == float('inf') and not other.increasing
    with pytest.raises(ValueError):
        ops.parse_randaugment('augmix-m9')
    with pytest.raises(ValueError):
        ops.parse_randaugment('rand-m9-zz3')


# ----------------------------------------------------------------------------
# Geometry: flip, crops, resizes


def test_flip():
    img = _rand_image()
    np.testing.assert_array_equal(ops.flip_left_right(img).numpy(), img[:, ::-1])
    np.testing.assert_array_equal(
        ops.random_flip_left_right(img, SEED, prob=1.0).numpy(), img[:, ::-1]
    )
    np.testing.assert_array_equal(ops.random_flip_left_right(img, SEED, prob=0.0).numpy(), img)
    flips = [
        not np.array_equal(ops.random_flip_left_right(img, _seed(i)).numpy(), img)
        for i in range(40)
    ]
    assert 5 < sum(flips) < 35


def test_random_resized_crop_size_dtype_and_determinism():
    img = _rand_image(30, 50)
    out = ops.random_resized_crop(img, SEED, size=16)
    assert out.shape == (16, 16, 3) and out.dtype == tf.uint8
    np.testing.assert_array_equal(out.numpy(), ops.random_resized_crop(img, SEED, size=16).numpy())
    outs = {ops.random_resized_crop(img, _seed(i), size=16).numpy().tobytes() for i in range(5)}
    assert len(outs) > 1
    # float input keeps its dtype
    assert ops.random_resized_crop(tf.cast(img, tf.float32), SEED, size=8).dtype == tf.float32


def test_random_resized_crop_whole_image_and_fallback():
    img = _rand_image(20, 20)
    # scale 1, ratio 1 on a square image: the crop is the whole image; a bicubic
    # resize to the same size is the identity.
    out = ops.random_resized_crop(img, SEED, size=20, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_array_equal(out.numpy(), img)
    # 10x40 image, square crops of the whole area never fit: fallback is the
    # centred 10x10 crop (left = (40 - 10) // 2 = 15).
    wide = _rand_image(10, 40)
    out = ops.random_resized_crop(wide, SEED, size=10, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_array_equal(out.numpy(), wide[:, 15:25])


def test_resize_short_side_and_center_crop():
    img = _rand_image(30, 50)
    assert ops.resize_short_side(img, 20).shape == (20, 33, 3)  # 20 * 50 // 30
    assert ops.resize_short_side(_rand_image(50, 30), 20).shape == (33, 20, 3)
    np.testing.assert_array_equal(ops.resize_short_side(img, 30).numpy(), img)
    x = np.arange(7 * 9 * 3, dtype=np.uint8).reshape(7, 9, 3)
    # offsets round((7-4)/2)=round(1.5)=2 and round((9-4)/2)=round(2.5)=2 (half to even)
    np.testing.assert_array_equal(ops.center_crop(x, 4).numpy(), x[2:6, 2:6])
    np.testing.assert_array_equal(ops.center_crop(x[:6, :8], 4).numpy(), x[1:5, 2:6])


@pytest.mark.parametrize(
    'fmt,options',
    [
        ('JPEG', dict(quality=90, subsampling=2)),  # 4:2:0 chroma, the common case
        ('JPEG', dict(quality=95, subsampling=1)),  # 4:2:2
        ('JPEG', dict(quality=75, subsampling=0, progressive=True)),
        ('PNG', {}),
    ],
)
def test_decode_random_crop_equals_full_decode_then_crop(fmt, options):
    # Smooth content with texture, sides not multiples of the 16-pixel MCU.
    yy, xx = np.mgrid[0:83, 0:117]
    array = np.stack([yy * 3, xx * 2, (yy * xx) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **options)
    data = tf.constant(buf.getvalue())
    full = ops.decode_image(data).numpy()
    shapes = set()
    for i in range(25):
        top, left, h, w = ops.random_crop_window(83, 117, _seed(i)).numpy()
        crop = ops.decode_random_crop(data, _seed(i)).numpy()
        np.testing.assert_array_equal(crop, full[top : top + h, left : left + w])
        shapes.add((h, w))
        # resized, the window gives exactly random_resized_crop of the decoded image
        if i < 3:
            np.testing.assert_array_equal(
                ops.resize(crop, [16, 16]).numpy(),
                ops.random_resized_crop(full, _seed(i), size=16).numpy(),
            )
    assert len(shapes) > 10
    truncated = buf.getvalue()[: len(buf.getvalue()) // 2]
    for corrupt in (truncated, b'\xff\xd8\xff garbage after a JPEG marker', b'not an image'):
        with pytest.raises(tf.errors.InvalidArgumentError):
            ops.decode_random_crop(tf.constant(corrupt), SEED)


# ----------------------------------------------------------------------------
# RandAugment ops


@pytest.mark.parametrize('name', sorted(set(ops.INCREASING_OPS + ops.DEFAULT_OPS)))
def test_each_op_shape_and_dtype(name):
    img = _rand_image(20, 28)
    for mag in (0.0, 9.0, 10.0):
        out = ops.randaugment_op(name, img, mag, SEED)
        assert out.shape == img.shape and out.dtype == tf.uint8
        out_f = ops.randaugment_op(name, tf.cast(img, tf.float32), mag, SEED)
        assert out_f.shape == img.shape and out_f.dtype == tf.float32
        v = out_f.numpy()
        assert v.min() >= 0 and v.max() <= 255


def test_invert_solarize_posterize():
    img = _rand_image()
    np.testing.assert_array_equal(ops.invert(img).numpy(), 255 - img)
    np.testing.assert_array_equal(ops.invert(ops.invert(img)).numpy(), img)
    x = np.array([[[0, 127, 128], [129, 200, 255]]], np.uint8)
    np.testing.assert_array_equal(
        ops.solarize(x, 128).numpy(), [[[0, 127, 127], [126, 55, 0]]]
    )  # >= 128 inverted
    np.testing.assert_array_equal(ops.solarize(x, 256).numpy(), x)
    np.testing.assert_array_equal(ops.solarize(x, 0).numpy(), 255 - x)
    np.testing.assert_array_equal(
        ops.solarize_add(x, 100, 128).numpy(), [[[100, 227, 128], [129, 200, 255]]]
    )
    np.testing.assert_array_equal(ops.posterize(img, 4).numpy(), img & 0xF0)
    np.testing.assert_array_equal(ops.posterize(img, 1).numpy(), img & 0x80)
    np.testing.assert_array_equal(ops.posterize(img, 8).numpy(), img)
    np.testing.assert_array_equal(ops.posterize(img, 0).numpy(), np.zeros_like(img))
    # the 'increasing' posterize/solarize arguments at magnitude 9 (timm mapping)
    np.testing.assert_array_equal(
        ops.randaugment_op('PosterizeIncreasing', img, 9.0, SEED).numpy(), img & 0x80
    )  # 4 - int(3.6) = 1 bit
    np.testing.assert_array_equal(
        ops.randaugment_op('SolarizeIncreasing', img, 9.0, SEED).numpy(),
        ops.solarize(img, 256 - 230).numpy(),
    )  # 256 - int(230.4)


def test_pil_equivalent_ops():
    img = _rand_image(24, 32, seed=1)
    img[:, :, 2] = img[:, :, 2] // 3 + 40  # a channel with a narrow range
    pil = Image.fromarray(img)
    np.testing.assert_array_equal(ops.equalize(img).numpy(), np.asarray(ImageOps.equalize(pil)))
    np.testing.assert_allclose(
        ops.auto_contrast(img).numpy(), np.asarray(ImageOps.autocontrast(pil)), atol=1
    )
    for fn, enh in (
        (ops.color, ImageEnhance.Color),
        (ops.contrast, ImageEnhance.Contrast),
        (ops.brightness, ImageEnhance.Brightness),
        (ops.sharpness, ImageEnhance.Sharpness),
    ):
        for factor in (0.1, 0.6, 1.5, 1.9):
            ours = fn(img, factor).numpy().astype(int)
            ref = np.asarray(enh(pil).enhance(factor)).astype(int)
            assert np.abs(ours - ref).max() <= 1, (fn.__name__, factor)
    const = np.full((5, 6, 3), 77, np.uint8)
    np.testing.assert_array_equal(ops.auto_contrast(const).numpy(), const)
    np.testing.assert_array_equal(ops.equalize(const).numpy(), const)


def test_geometric_ops():
    sq = _rand_image(8, 8)
    np.testing.assert_array_equal(ops.rotate(sq, 90.0).numpy(), np.rot90(sq))
    np.testing.assert_array_equal(ops.rotate(sq, 0.0).numpy(), sq)
    np.testing.assert_array_equal(ops.shear_x(sq, 0.0).numpy(), sq)
    fill = (1, 2, 3)
    out = ops.translate_x(sq, 3.0, fill=fill).numpy()
    np.testing.assert_array_equal(out[:, :5], sq[:, 3:])  # content moves left
    np.testing.assert_array_equal(out[:, 5:], np.broadcast_to(fill, (8, 3, 3)))
    out = ops.translate_y(sq, -2.0, fill=fill).numpy()
    np.testing.assert_array_equal(out[2:], sq[:6])
    np.testing.assert_array_equal(out[:2], np.broadcast_to(fill, (2, 8, 3)))
    # PIL affine shear for comparison (bilinear; allow rounding differences)
    img = _rand_image(16, 16, seed=2)
    ref = np.asarray(
        Image.fromarray(img).transform(
            (16, 16),
            Image.AFFINE,
            (1, 0.25, 0, 0, 1, 0),
            resample=Image.BILINEAR,
            fillcolor=(128, 128, 128),
        )
    )
    ours = ops.shear_x(img, 0.25).numpy()
    assert np.mean(np.abs(ours.astype(int) - ref.astype(int)) <= 2) > 0.9


def test_randaugment_determinism_and_identity():
    img = _rand_image(16, 16)
    a = ops.randaugment(img, SEED, 'rand-m9-mstd0.5-inc1').numpy()
    b = ops.randaugment(img, SEED, 'rand-m9-mstd0.5-inc1').numpy()
    np.testing.assert_array_equal(a, b)
    assert a.shape == img.shape and a.dtype == np.uint8
    outs = {
        ops.randaugment(img, _seed(i), 'rand-m9-mstd0.5-inc1').numpy().tobytes() for i in range(8)
    }
    assert len(outs) > 2
    np.testing.assert_array_equal(ops.randaugment(img, SEED, 'rand-m9-p0').numpy(), img)


# ----------------------------------------------------------------------------
# Every RandAugment op against its definition written with PIL, magnitude mapping included.


def _solarize_add_lut(addition, threshold=128):
    return [min(255, v + addition) if v < threshold else v for v in range(256)] * 3


def _pil_affine(pil, coefficients):
    return pil.transform(
        pil.size, Image.AFFINE, coefficients, resample=Image.BILINEAR, fillcolor=(128, 128, 128)
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
        'Rotate': lambda: pil.rotate(
            sign * 30 * level, resample=Image.BILINEAR, fillcolor=(128, 128, 128)
        ),
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


GEOMETRIC_OPS = ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')


def _agreement(ours, reference, name):
    """Pixel ops: equal up to rounding (1); geometric ops (bilinear sampling at other positions
    of the pixel grid, fill mixed in at the borders): 90% of the values within 2."""
    diff = np.abs(ours.astype(int) - reference.astype(int))
    if name in GEOMETRIC_OPS:
        return np.mean(diff <= 2) >= 0.9
    return diff.max() <= 1


@pytest.mark.parametrize('name', sorted(set(ops.INCREASING_OPS + ops.DEFAULT_OPS)))
@pytest.mark.parametrize('magnitude', [4.0, 9.0])
def test_randaugment_op_matches_its_pil_definition(name, magnitude):
    # Channels of half range at three offsets (the last up to 255): AutoContrast, Equalize and
    # the highest Solarize threshold (230) all change them.
    img = (_rand_image(24, 32, seed=5) // 2 + np.array([30, 100, 128])).astype(np.uint8)
    pil = Image.fromarray(img)
    ours = ops.randaugment_op(name, img, magnitude, SEED).numpy()
    candidates = {sign: np.asarray(pil_randaugment(name, pil, magnitude, sign)) for sign in (1, -1)}
    assert any(_agreement(ours, ref, name) for ref in candidates.values()), name
    # The op changes the image at this magnitude, so an op that returned its input would fail.
    assert all(not _agreement(img, ref, name) for ref in candidates.values()), name
