"""Tests of the TF preprocessing ops (small images, eager mode)."""

import io

import numpy as np
import pytest
import tensorflow as tf
from helpers import random_image
from PIL import Image

from crossformer_jax.data import preprocess_ops as ops

SEED = tf.constant([3, 7], tf.int64)


def _seed(i):
    return tf.constant([i, 11], tf.int64)


# ----------------------------------------------------------------------------
# Geometry: flip, crops, resizes


def test_flip():
    img = random_image()
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
    img = random_image(30, 50)
    out = ops.random_resized_crop(img, SEED, size=16)
    assert out.shape == (16, 16, 3) and out.dtype == tf.uint8
    np.testing.assert_array_equal(out.numpy(), ops.random_resized_crop(img, SEED, size=16).numpy())
    outs = {ops.random_resized_crop(img, _seed(i), size=16).numpy().tobytes() for i in range(5)}
    assert len(outs) > 1
    # resizing is defined on uint8 images only
    with pytest.raises(TypeError, match='uint8'):
        ops.random_resized_crop(tf.cast(img, tf.float32), SEED, size=8)


def test_random_resized_crop_whole_image_and_fallback():
    img = random_image(20, 20)
    # scale 1, ratio 1 on a square image: the crop is the whole image; a bicubic
    # resize to the same size is the identity.
    out = ops.random_resized_crop(img, SEED, size=20, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_array_equal(out.numpy(), img)
    # 10x40 image, square crops of the whole area never fit: fallback is the
    # centred 10x10 crop (left = (40 - 10) // 2 = 15).
    wide = random_image(10, 40)
    out = ops.random_resized_crop(wide, SEED, size=10, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_array_equal(out.numpy(), wide[:, 15:25])


@pytest.mark.parametrize('method', ['bicubic', 'bilinear', 'nearest'])
def test_resize_is_pil_resize(method):
    img = random_image(37, 53, seed=4)
    filters = {
        'bicubic': Image.Resampling.BICUBIC,
        'bilinear': Image.Resampling.BILINEAR,
        'nearest': Image.Resampling.NEAREST,
    }
    for h, w in ((16, 16), (20, 90), (37, 53)):
        ref = np.asarray(Image.fromarray(img).resize((w, h), filters[method]))
        np.testing.assert_array_equal(ops.resize(img, [h, w], method=method).numpy(), ref)
    # inside a graph with a size known only at run time
    fn = tf.function(lambda x, size: ops.resize(x, size, method=method))
    out = fn(tf.constant(img), tf.constant([11, 7]))
    ref = np.asarray(Image.fromarray(img).resize((7, 11), filters[method]))
    np.testing.assert_array_equal(out.numpy(), ref)
    with pytest.raises(ValueError, match='resize method'):
        ops.resize(img, [8, 8], method='lanczos')


def test_resize_short_side_and_center_crop():
    img = random_image(30, 50)
    assert ops.resize_short_side(img, 20).shape == (20, 33, 3)  # 20 * 50 // 30
    assert ops.resize_short_side(random_image(50, 30), 20).shape == (33, 20, 3)
    np.testing.assert_array_equal(ops.resize_short_side(img, 30).numpy(), img)
    x = np.arange(7 * 9 * 3, dtype=np.uint8).reshape(7, 9, 3)
    # offsets round((7-4)/2)=round(1.5)=2 and round((9-4)/2)=round(2.5)=2 (half to even)
    np.testing.assert_array_equal(ops.center_crop(x, 4).numpy(), x[2:6, 2:6])
    np.testing.assert_array_equal(ops.center_crop(x[:6, :8], 4).numpy(), x[1:5, 2:6])


@pytest.mark.parametrize('fmt,options', [('JPEG', dict(quality=90, subsampling=2)), ('PNG', {})])
def test_decode_random_crop_equals_full_decode_then_crop(fmt, options):
    # Smooth content with texture; the windows follow random_crop_window of the image size.
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
