"""Image preprocessing ops for the tf.data input pipeline.

Small composable TensorFlow functions, usable inside ``tf.data`` map functions
(graph mode) and eagerly. Conventions:

* Images are uint8 ``(H, W, 3)`` tensors.
* Resizing is PIL's resampler (``resize``), the one the reference PyTorch pipelines use, so
  crops and resizes match torchvision/timm pixel for pixel.
* RandAugment, normalisation and random erasing are not here: they run on the device, on
  whole uint8 batches (``crossformer_jax.augment.randaugment``,
  ``crossformer_jax.augment.batch_ops``).
* Random ops take a stateless seed: an int32/int64 tensor of shape ``[2]``
  (see ``tf.random.experimental.stateless_split`` / ``stateless_fold_in``).
  The same image and seed always give the same output, so a pipeline built from
  these ops is reproducible and can be resumed at any position.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
from PIL import Image

# ----------------------------------------------------------------------------
# Helpers


def _tensor_input(fn):
    """Lets an op take numpy arrays / lists as well as tensors."""

    @functools.wraps(fn)
    def wrapper(image, *args, **kwargs):
        return fn(tf.convert_to_tensor(image), *args, **kwargs)

    return wrapper


def _split(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
    return tf.unstack(tf.random.experimental.stateless_split(seed, num))


def _uniform(seed, shape=(), minval=0.0, maxval=1.0) -> tf.Tensor:
    return tf.random.stateless_uniform(list(shape), seed, minval=minval, maxval=maxval)


def _randint_inclusive(u: tf.Tensor, high: tf.Tensor) -> tf.Tensor:
    """Maps u ~ U[0, 1) to an integer in [0, high] (high >= 0, int32)."""
    r = tf.cast(tf.floor(u * tf.cast(high + 1, tf.float32)), tf.int32)
    return tf.clip_by_value(r, 0, tf.maximum(high, 0))


# ----------------------------------------------------------------------------
# Decoding, resizing, cropping, flipping, normalisation


def decode_image(data: tf.Tensor) -> tf.Tensor:
    """Decodes JPEG / PNG / GIF / BMP / WebP bytes into a uint8 (H, W, 3) image.

    Raises ``tf.errors.InvalidArgumentError`` at run time on corrupt data (the
    input pipeline catches that and skips the example).
    """
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


_PIL_FILTERS = {
    'bicubic': Image.Resampling.BICUBIC,
    'bilinear': Image.Resampling.BILINEAR,
    'nearest': Image.Resampling.NEAREST,
}


def _pil_resize(image: np.ndarray, height: np.ndarray, width: np.ndarray, *, method: str):
    pil = Image.fromarray(image).resize((int(width), int(height)), _PIL_FILTERS[method])
    return np.asarray(pil)


@_tensor_input
def resize(image: tf.Tensor, size_hw, method: str = 'bicubic') -> tf.Tensor:
    """Resizes a uint8 (H, W, 3) image to ``size_hw`` = (height, width) with PIL's resampler.

    ``method``: 'bicubic', 'bilinear' or 'nearest'. This is the resampling of the reference
    PyTorch pipelines (torchvision / timm on PIL images), pixel for pixel: the kernel is widened
    when downsampling and the horizontal pass is rounded to uint8 before the vertical one. Runs
    PIL through ``tf.numpy_function`` (PIL releases the GIL while it resamples, so tf.data's
    threads resize in parallel) and is about twice as fast as ``tf.image.resize``.
    """
    if image.dtype != tf.uint8:
        raise TypeError(f'resize takes uint8 images, got {image.dtype.name}')
    if method not in _PIL_FILTERS:
        raise ValueError(f'resize method must be one of {sorted(_PIL_FILTERS)}, got {method!r}')
    size_hw = tf.cast(size_hw, tf.int32)
    out = tf.numpy_function(
        functools.partial(_pil_resize, method=method),
        [image, size_hw[0], size_hw[1]],
        tf.uint8,
        stateful=False,
    )
    static = tf.get_static_value(size_hw)
    out.set_shape([None, None, 3] if static is None else [int(static[0]), int(static[1]), 3])
    return out


def random_crop_window(
    height: tf.Tensor,
    width: tf.Tensor,
    seed: tf.Tensor,
    *,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> tf.Tensor:
    """The window of an Inception-style random resized crop (torchvision/timm semantics).

    Up to ``attempts`` draws of (area fraction ~ U(scale), log aspect ratio
    ~ U(log ratio)); crop width/height are ``round(sqrt(area * aspect))`` /
    ``round(sqrt(area / aspect))``; the first draw that fits is used, at a uniform
    position. If none fits, a centred crop of the whole image with the aspect ratio
    clamped to ``ratio``. Returns int32 ``[top, left, crop_height, crop_width]``.
    """
    h, w = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    s_area, s_ratio, s_top, s_left = _split(seed, 4)
    target_area = hf * wf * _uniform(s_area, [attempts], scale[0], scale[1])
    log_ratio = _uniform(s_ratio, [attempts], math.log(ratio[0]), math.log(ratio[1]))
    aspect = tf.exp(log_ratio)
    cw = tf.round(tf.sqrt(target_area * aspect))  # round half to even, as Python
    ch = tf.round(tf.sqrt(target_area / aspect))
    fits = (cw >= 1) & (cw <= wf) & (ch >= 1) & (ch <= hf)
    found = tf.reduce_any(fits)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)

    # Fallback: whole image, aspect ratio clamped into `ratio`, centred.
    rmin, rmax = min(ratio), max(ratio)
    in_ratio = wf / hf
    fb_w = tf.where(in_ratio > rmax, tf.round(hf * rmax), wf)
    fb_h = tf.where(in_ratio < rmin, tf.round(wf / rmin), hf)

    crop_w = tf.cast(tf.where(found, cw[first], fb_w), tf.int32)
    crop_h = tf.cast(tf.where(found, ch[first], fb_h), tf.int32)
    crop_w = tf.clip_by_value(crop_w, 1, w)
    crop_h = tf.clip_by_value(crop_h, 1, h)
    top = tf.where(found, _randint_inclusive(_uniform(s_top), h - crop_h), (h - crop_h) // 2)
    left = tf.where(found, _randint_inclusive(_uniform(s_left), w - crop_w), (w - crop_w) // 2)
    return tf.stack([top, left, crop_h, crop_w])


@_tensor_input
def random_crop(
    image: tf.Tensor,
    seed: tf.Tensor,
    *,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> tf.Tensor:
    """The ``random_crop_window(H, W, seed)`` of an (H, W, 3) image: (h, w, 3)."""
    shape = tf.shape(image)
    top, left, crop_h, crop_w = tf.unstack(
        random_crop_window(shape[0], shape[1], seed, scale=scale, ratio=ratio, attempts=attempts)
    )
    out = image[top : top + crop_h, left : left + crop_w]
    out.set_shape([None, None, 3])
    return out


def decode_random_crop(
    data: tf.Tensor,
    seed: tf.Tensor,
    *,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> tf.Tensor:
    """Decodes encoded image bytes and crops their ``random_crop_window``: uint8 (h, w, 3).

    The whole image is decoded (``decode_image``) and then cropped. Decoding only the
    window of a JPEG (``extract_jpeg_shape`` + ``decode_and_crop_jpeg`` with a one-MCU
    margin so that chroma upsampling sees the same neighbours) gave the same pixels but cost
    more CPU per ImageNet-sized image (1.64 against 1.44 ms on one core for 500x375 JPEGs):
    the entropy decoding of the skipped rows still runs, and the format branch and header
    parse add their own work. Raises on corrupt data, like ``decode_image``.
    """
    return random_crop(decode_image(data), seed, scale=scale, ratio=ratio)


@_tensor_input
def random_resized_crop(
    image: tf.Tensor,
    seed: tf.Tensor,
    *,
    size: int,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    attempts: int = 10,
    method: str = 'bicubic',
) -> tf.Tensor:
    """``random_crop`` resized to ``size x size``."""
    crop = random_crop(image, seed, scale=scale, ratio=ratio, attempts=attempts)
    out = resize(crop, [size, size], method=method)
    out.set_shape([size, size, 3])
    return out


@_tensor_input
def random_flip_left_right(image: tf.Tensor, seed: tf.Tensor, prob: float = 0.5) -> tf.Tensor:
    """Mirrors the image horizontally with probability ``prob``."""
    flip = _uniform(seed) < prob
    return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)


@_tensor_input
def flip_left_right(image: tf.Tensor) -> tf.Tensor:
    return tf.reverse(image, axis=[1])


@_tensor_input
def resize_short_side(image: tf.Tensor, short: int, method: str = 'bicubic') -> tf.Tensor:
    """Resizes so the shorter side is ``short`` (torchvision ``Resize(int)``).

    The longer side becomes ``floor(short * long / short_in)``. An image whose
    size already matches is returned unchanged.
    """
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    short_in = tf.minimum(h, w)
    new_h = tf.where(h <= w, short, (short * h) // short_in)
    new_w = tf.where(h <= w, (short * w) // short_in, short)
    same = tf.logical_and(tf.equal(new_h, h), tf.equal(new_w, w))
    return tf.cond(
        same, lambda: image, lambda: resize(image, tf.stack([new_h, new_w]), method=method)
    )


@_tensor_input
def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """Central ``size x size`` crop; offsets ``round((H - size) / 2)`` (half to even,
    as torchvision's ``CenterCrop``). The image must be at least ``size`` on each side."""
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    top = tf.cast(tf.round(tf.cast(h - size, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(w - size, tf.float32) / 2.0), tf.int32)
    out = image[top : top + size, left : left + size]
    out.set_shape([size, size, image.shape[-1]])
    return out
