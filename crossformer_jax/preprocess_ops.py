"""Image preprocessing ops for the tf.data input pipeline.

Small composable TensorFlow functions, usable inside ``tf.data`` map functions
(graph mode). Conventions:

* Images are ``(H, W, 3)`` tensors with pixel values in ``[0, 255]``, either
  ``uint8`` or a float dtype. Every pixel op returns the dtype it was given:
  for ``uint8`` the result is clipped to ``[0, 255]`` and rounded the way PIL
  rounds that op (blends truncate, resampling rounds to nearest); for floats it
  is only clipped.
* Normalisation and random erasing are not here: they run on the device, on
  whole uint8 batches (``crossformer_jax.batch_ops``).
* Random ops take a stateless seed: an int32/int64 tensor of shape ``[2]``
  (see ``tf.random.experimental.stateless_split`` / ``stateless_fold_in``).
  The same image and seed always give the same output, so a pipeline built from
  these ops is reproducible and can be resumed at any position.

The RandAugment ops follow the PIL-based semantics of timm's ``auto_augment``
module (op set, magnitude-to-argument mapping, per-op probability, Gaussian
magnitude noise). Geometric ops use ``tf.raw_ops.ImageProjectiveTransformV3``
with bilinear sampling (PIL would use bicubic when asked; TF's projective
transform has no bicubic mode).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Sequence

import tensorflow as tf

_LEVEL_DENOM = 10.0  # RandAugment magnitudes live on [0, 10].
_JPEG_MARGIN = 16  # pixels decoded around a JPEG crop window (one MCU)


# ----------------------------------------------------------------------------
# dtype helpers


def _tensor_input(fn):
    """Lets an op take numpy arrays / lists as well as tensors."""

    @functools.wraps(fn)
    def wrapper(image, *args, **kwargs):
        return fn(tf.convert_to_tensor(image), *args, **kwargs)

    return wrapper


def _to_float(image: tf.Tensor) -> tf.Tensor:
    return tf.cast(image, tf.float32)


def _restore(x: tf.Tensor, dtype: tf.DType, rounding: str = 'floor') -> tf.Tensor:
    """Clips float pixels to [0, 255] and casts back to ``dtype``.

    ``rounding`` only matters for integer dtypes: 'floor' (PIL's truncation in
    blends and lookup tables) or 'nearest' (round half up, PIL's resamplers).
    """
    x = tf.clip_by_value(x, 0.0, 255.0)
    if dtype.is_integer:
        x = tf.floor(x) if rounding == 'floor' else tf.floor(x + 0.5)
        return tf.cast(tf.clip_by_value(x, 0.0, 255.0), dtype)
    return tf.cast(x, dtype)


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


@_tensor_input
def resize(image: tf.Tensor, size_hw, method: str = 'bicubic', antialias: bool = True) -> tf.Tensor:
    """Resizes to ``size_hw`` = (height, width).

    With ``antialias=True`` bicubic/bilinear behave like PIL's resamplers (the
    kernel is widened when downsampling), which is what the reference PyTorch
    pipeline (torchvision on PIL images) uses.
    """
    dtype = image.dtype
    out = tf.image.resize(_to_float(image), size_hw, method=method, antialias=antialias)
    return _restore(out, dtype, rounding='nearest')


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


def decode_random_crop(
    data: tf.Tensor,
    seed: tf.Tensor,
    *,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> tf.Tensor:
    """Decodes only the ``random_crop_window`` of encoded image bytes: uint8 (h, w, 3).

    JPEG: the window is drawn from the header's size and only its rows and blocks
    are decoded (``decode_and_crop_jpeg``). Other formats are decoded whole and
    cropped. The same bytes and seed give the same pixels as ``decode_image``
    followed by cropping that window. Raises on corrupt data, like ``decode_image``.
    """

    def jpeg():
        shape = tf.image.extract_jpeg_shape(data)
        top, left, ch, cw = tf.unstack(
            random_crop_window(shape[0], shape[1], seed, scale=scale, ratio=ratio)
        )
        # Chroma upsampling reads neighbouring samples: decoding a margin of one
        # 16-pixel MCU around the window makes its pixels those of the full decode.
        top0, left0 = tf.maximum(top - _JPEG_MARGIN, 0), tf.maximum(left - _JPEG_MARGIN, 0)
        bottom = tf.minimum(top + ch + _JPEG_MARGIN, shape[0])
        right = tf.minimum(left + cw + _JPEG_MARGIN, shape[1])
        window = tf.stack([top0, left0, bottom - top0, right - left0])
        padded = tf.image.decode_and_crop_jpeg(data, window, channels=3)
        return padded[top - top0 : top - top0 + ch, left - left0 : left - left0 + cw]

    def other():
        image = decode_image(data)
        shape = tf.shape(image)
        top, left, ch, cw = tf.unstack(
            random_crop_window(shape[0], shape[1], seed, scale=scale, ratio=ratio)
        )
        return image[top : top + ch, left : left + cw]

    out = tf.cond(tf.io.is_jpeg(data), jpeg, other)
    out.set_shape([None, None, 3])
    return out


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
    """Crops ``random_crop_window(H, W, seed)`` and resizes it to ``size x size``."""
    shape = tf.shape(image)
    top, left, crop_h, crop_w = tf.unstack(
        random_crop_window(shape[0], shape[1], seed, scale=scale, ratio=ratio, attempts=attempts)
    )
    crop = image[top : top + crop_h, left : left + crop_w]
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


# ----------------------------------------------------------------------------
# Pixel ops used by RandAugment (PIL ImageOps / ImageEnhance semantics)


def _grayscale(x: tf.Tensor) -> tf.Tensor:
    """PIL 'L' conversion (ITU-R 601-2 luma with PIL's fixed-point weights), (H, W, 1)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    gray = tf.floor((r * 19595.0 + g * 38470.0 + b * 7471.0 + 32768.0) / 65536.0)
    return gray[..., None]


def _blend(degenerate: tf.Tensor, x: tf.Tensor, factor) -> tf.Tensor:
    """PIL ``Image.blend(degenerate, x, factor)`` in float (no clipping yet)."""
    factor = tf.cast(factor, tf.float32)
    return degenerate + factor * (x - degenerate)


@_tensor_input
def invert(image: tf.Tensor) -> tf.Tensor:
    return _restore(255.0 - _to_float(image), image.dtype)


@_tensor_input
def solarize(image: tf.Tensor, threshold) -> tf.Tensor:
    """Inverts every pixel value >= ``threshold`` (PIL ``ImageOps.solarize``)."""
    x = _to_float(image)
    thr = tf.cast(threshold, tf.float32)
    return _restore(tf.where(x >= thr, 255.0 - x, x), image.dtype)


@_tensor_input
def solarize_add(image: tf.Tensor, addition, threshold=128) -> tf.Tensor:
    """Adds ``addition`` to pixel values < ``threshold`` (saturating at 255)."""
    x = _to_float(image)
    thr = tf.cast(threshold, tf.float32)
    add = tf.cast(addition, tf.float32)
    return _restore(tf.where(x < thr, tf.minimum(x + add, 255.0), x), image.dtype)


@_tensor_input
def posterize(image: tf.Tensor, bits) -> tf.Tensor:
    """Keeps the ``bits`` most significant bits of each channel (0 bits -> black)."""
    x = tf.cast(tf.floor(tf.clip_by_value(_to_float(image), 0.0, 255.0)), tf.int32)
    shift = tf.clip_by_value(8 - tf.cast(bits, tf.int32), 0, 8)
    x = tf.bitwise.left_shift(tf.bitwise.right_shift(x, shift), shift)
    return tf.cast(x, image.dtype)


@_tensor_input
def auto_contrast(image: tf.Tensor) -> tf.Tensor:
    """Per channel, stretches [min, max] to [0, 255] (PIL ``ImageOps.autocontrast``,
    cutoff 0); a constant channel is left as it is."""
    x = _to_float(image)
    lo = tf.reduce_min(x, axis=[0, 1], keepdims=True)
    hi = tf.reduce_max(x, axis=[0, 1], keepdims=True)
    span = hi - lo
    stretched = tf.floor((x - lo) * 255.0 / tf.where(span > 0, span, 1.0))
    return _restore(tf.where(span > 0, stretched, x), image.dtype)


def _equalize_channel(c: tf.Tensor) -> tf.Tensor:
    """PIL ``ImageOps.equalize`` lookup table for one int32 (H, W) channel."""
    hist = tf.math.bincount(tf.reshape(c, [-1]), minlength=256, maxlength=256, dtype=tf.int32)
    nonzero = tf.boolean_mask(hist, hist > 0)
    step = (tf.reduce_sum(hist) - nonzero[-1]) // 255
    safe = tf.maximum(step, 1)
    lut = (step // 2 + tf.cumsum(hist, exclusive=True)) // safe
    lut = tf.clip_by_value(lut, 0, 255)
    return tf.where(step > 0, tf.gather(lut, c), c)


@_tensor_input
def equalize(image: tf.Tensor) -> tf.Tensor:
    """Histogram equalisation per channel (PIL ``ImageOps.equalize``)."""
    x = tf.cast(tf.floor(tf.clip_by_value(_to_float(image), 0.0, 255.0)), tf.int32)
    out = tf.stack([_equalize_channel(x[..., i]) for i in range(3)], axis=-1)
    return tf.cast(out, image.dtype)


@_tensor_input
def color(image: tf.Tensor, factor) -> tf.Tensor:
    """Saturation (PIL ``ImageEnhance.Color``): blend with the greyscale image."""
    x = _to_float(image)
    return _restore(_blend(_grayscale(x), x, factor), image.dtype)


@_tensor_input
def contrast(image: tf.Tensor, factor) -> tf.Tensor:
    """PIL ``ImageEnhance.Contrast``: blend with the mean grey level (rounded)."""
    x = _to_float(image)
    mean = tf.floor(tf.reduce_mean(_grayscale(x)) + 0.5)
    return _restore(_blend(mean, x, factor), image.dtype)


@_tensor_input
def brightness(image: tf.Tensor, factor) -> tf.Tensor:
    """PIL ``ImageEnhance.Brightness``: blend with black."""
    x = _to_float(image)
    return _restore(_blend(tf.zeros_like(x), x, factor), image.dtype)


@_tensor_input
def sharpness(image: tf.Tensor, factor) -> tf.Tensor:
    """PIL ``ImageEnhance.Sharpness``: blend with the SMOOTH-filtered image.

    The smoothing kernel is [[1,1,1],[1,5,1],[1,1,1]] / 13 (rounded to integers as
    PIL does); the one-pixel border keeps the original pixels.
    """
    x = _to_float(image)
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(x[None], kernel, [1, 1, 1, 1], 'SAME')[0]
    smooth = tf.floor(smooth + 0.5)
    shape = tf.shape(x)
    rows = tf.range(shape[0])[:, None]
    cols = tf.range(shape[1])[None, :]
    interior = (rows > 0) & (rows < shape[0] - 1) & (cols > 0) & (cols < shape[1] - 1)
    degenerate = tf.where(interior[:, :, None], smooth, x)
    return _restore(_blend(degenerate, x, factor), image.dtype)


# ----------------------------------------------------------------------------
# Geometric ops (PIL affine semantics, constant fill)


@_tensor_input
def affine_transform(image: tf.Tensor, matrix, fill=(128, 128, 128)) -> tf.Tensor:
    """Applies a PIL-style affine map with bilinear sampling and constant fill.

    ``matrix`` = (a, b, c, d, e, f): output pixel (x, y) takes the input at
    (a x + b y + c, d x + e y + f), in PIL's continuous coordinates (pixel centres
    at +0.5). Out-of-image samples take the per-channel ``fill`` colour (mixed
    bilinearly at the border).
    """
    a, b, c, d, e, f = [tf.cast(v, tf.float32) for v in matrix]
    # PIL coordinates -> TF pixel-index coordinates (centres at integers).
    c = c + 0.5 * a + 0.5 * b - 0.5
    f = f + 0.5 * d + 0.5 * e - 0.5
    transform = tf.stack([a, b, c, d, e, f, 0.0, 0.0])[None]
    x = _to_float(image)
    # A ones channel, transformed with fill 0, tells how much of each output
    # pixel came from inside the image; the rest is the fill colour.
    x4 = tf.concat([x, tf.ones_like(x[..., :1])], axis=-1)[None]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=x4,
        transforms=transform,
        output_shape=tf.shape(image)[:2],
        fill_value=tf.constant(0.0, tf.float32),
        interpolation='BILINEAR',
        fill_mode='CONSTANT',
    )[0]
    rgb, inside = out[..., :3], out[..., 3:]
    rgb = rgb + (1.0 - inside) * tf.constant(fill, tf.float32)
    result = _restore(rgb, image.dtype, rounding='nearest')
    result.set_shape(image.shape)
    return result


@_tensor_input
def rotate(image: tf.Tensor, degrees, fill=(128, 128, 128)) -> tf.Tensor:
    """Rotates counter-clockwise by ``degrees`` about the image centre (PIL ``rotate``)."""
    shape = tf.shape(image)
    cx = tf.cast(shape[1], tf.float32) / 2.0
    cy = tf.cast(shape[0], tf.float32) / 2.0
    angle = -tf.cast(degrees, tf.float32) * (math.pi / 180.0)
    a, b = tf.cos(angle), tf.sin(angle)
    d, e = -tf.sin(angle), tf.cos(angle)
    c = a * (-cx) + b * (-cy) + cx
    f = d * (-cx) + e * (-cy) + cy
    return affine_transform(image, (a, b, c, d, e, f), fill)


@_tensor_input
def shear_x(image: tf.Tensor, factor, fill=(128, 128, 128)) -> tf.Tensor:
    """Output (x, y) samples input (x + factor * y, y) (PIL ``ShearX``)."""
    return affine_transform(image, (1.0, factor, 0.0, 0.0, 1.0, 0.0), fill)


@_tensor_input
def shear_y(image: tf.Tensor, factor, fill=(128, 128, 128)) -> tf.Tensor:
    """Output (x, y) samples input (x, factor * x + y) (PIL ``ShearY``)."""
    return affine_transform(image, (1.0, 0.0, 0.0, factor, 1.0, 0.0), fill)


@_tensor_input
def translate_x(image: tf.Tensor, pixels, fill=(128, 128, 128)) -> tf.Tensor:
    """Output (x, y) samples input (x + pixels, y): content moves left for pixels > 0."""
    return affine_transform(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0), fill)


@_tensor_input
def translate_y(image: tf.Tensor, pixels, fill=(128, 128, 128)) -> tf.Tensor:
    """Output (x, y) samples input (x, y + pixels): content moves up for pixels > 0."""
    return affine_transform(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels), fill)


# ----------------------------------------------------------------------------
# RandAugment

INCREASING_OPS = (
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

DEFAULT_OPS = (
    'AutoContrast',
    'Equalize',
    'Invert',
    'Rotate',
    'Posterize',
    'Solarize',
    'SolarizeAdd',
    'Color',
    'Contrast',
    'Brightness',
    'Sharpness',
    'ShearX',
    'ShearY',
    'TranslateXRel',
    'TranslateYRel',
)


@dataclasses.dataclass(frozen=True)
class RandAugmentConfig:
    """Parsed ``rand-...`` string (timm's RandAugment config syntax)."""

    num_layers: int = 2  # 'n'
    magnitude: float = 10.0  # 'm'
    magnitude_std: float = 0.0  # 'mstd' (inf: magnitude ~ U(0, m))
    magnitude_max: float = 10.0  # 'mmax'
    prob: float = 0.5  # 'p', probability of applying each chosen op
    increasing: bool = False  # 'inc'

    @property
    def ops(self) -> tuple[str, ...]:
        return INCREASING_OPS if self.increasing else DEFAULT_OPS


def parse_randaugment(spec: str) -> RandAugmentConfig:
    """Parses e.g. ``'rand-m9-mstd0.5-inc1'``.

    Sections after ``rand`` are ``m<float>`` magnitude, ``n<int>`` number of ops,
    ``mstd<float|inf>`` magnitude std, ``mmax<float>`` upper clip, ``p<float>``
    per-op probability, ``inc<0|1>`` increasing op set. Defaults: n=2, m=10,
    mstd=0, mmax=10, p=0.5, inc=0.
    """
    parts = spec.strip().split('-')
    if parts[0] != 'rand':
        raise ValueError(f"RandAugment spec must start with 'rand': {spec!r}")
    kw = {}
    for part in parts[1:]:
        if not part:
            continue
        m = re.fullmatch(r'(mstd|mmax|inc|m|n|p)(.+)', part)
        if m is None:
            raise ValueError(f'Unknown RandAugment section {part!r} in {spec!r}')
        key, val = m.groups()
        if key == 'mstd':
            kw['magnitude_std'] = float(val)  # float('inf') parses 'inf'
        elif key == 'mmax':
            kw['magnitude_max'] = float(val)
        elif key == 'inc':
            kw['increasing'] = bool(int(val))
        elif key == 'm':
            kw['magnitude'] = float(val)
        elif key == 'n':
            kw['num_layers'] = int(val)
        elif key == 'p':
            kw['prob'] = float(val)
    return RandAugmentConfig(**kw)


def _signed(value: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Negates ``value`` with probability 1/2 (timm ``_randomly_negate``)."""
    return tf.where(_uniform(seed) < 0.5, -value, value)


def randaugment_op(
    name: str,
    image: tf.Tensor,
    magnitude,
    seed: tf.Tensor,
    *,
    fill=(128, 128, 128),
    translate_pct: float = 0.45,
) -> tf.Tensor:
    """Applies one named RandAugment op at ``magnitude`` (0..10 scale).

    ``seed`` only drives the random sign of signed ops (rotate, shear, translate,
    the 'increasing' enhance ops). Magnitude-to-argument mapping (timm):
    Rotate 30 deg * m/10; Shear 0.3 * m/10; TranslateRel ``translate_pct`` * size
    * m/10; PosterizeIncreasing bits 4 - int(4 m/10); Posterize bits int(4 m/10);
    SolarizeIncreasing threshold 256 - int(256 m/10); Solarize threshold
    int(256 m/10); SolarizeAdd add int(110 m/10) below 128; *Increasing enhance
    factor 1 +- 0.9 m/10; plain enhance factor 0.1 + 1.8 m/10.
    """
    image = tf.convert_to_tensor(image)
    level = tf.cast(magnitude, tf.float32) / _LEVEL_DENOM
    shape = tf.shape(image)
    if name == 'AutoContrast':
        return auto_contrast(image)
    if name == 'Equalize':
        return equalize(image)
    if name == 'Invert':
        return invert(image)
    if name == 'Rotate':
        return rotate(image, _signed(level * 30.0, seed), fill)
    if name == 'PosterizeIncreasing':
        return posterize(image, 4 - tf.cast(tf.floor(level * 4.0), tf.int32))
    if name == 'Posterize':
        return posterize(image, tf.cast(tf.floor(level * 4.0), tf.int32))
    if name == 'SolarizeIncreasing':
        return solarize(image, 256.0 - tf.floor(level * 256.0))
    if name == 'Solarize':
        return solarize(image, tf.floor(level * 256.0))
    if name == 'SolarizeAdd':
        return solarize_add(image, tf.floor(level * 110.0), 128)
    enhance = {
        'Color': color,
        'Contrast': contrast,
        'Brightness': brightness,
        'Sharpness': sharpness,
    }
    if name.endswith('Increasing') and name[: -len('Increasing')] in enhance:
        return enhance[name[: -len('Increasing')]](image, 1.0 + _signed(level * 0.9, seed))
    if name in enhance:
        return enhance[name](image, level * 1.8 + 0.1)
    if name == 'ShearX':
        return shear_x(image, _signed(level * 0.3, seed), fill)
    if name == 'ShearY':
        return shear_y(image, _signed(level * 0.3, seed), fill)
    if name == 'TranslateXRel':
        px = level * translate_pct * tf.cast(shape[1], tf.float32)
        return translate_x(image, _signed(px, seed), fill)
    if name == 'TranslateYRel':
        px = level * translate_pct * tf.cast(shape[0], tf.float32)
        return translate_y(image, _signed(px, seed), fill)
    raise ValueError(f'Unknown RandAugment op {name!r}')


@functools.cache
def _randaugment_layer(
    names: tuple[str, ...],
    prob: float,
    magnitude: float,
    magnitude_std: float,
    magnitude_max: float,
    fill: tuple[float, ...],
    translate_pct: float,
):
    """One RandAugment layer as a ``tf.function`` (traced once per image shape and
    reused by every layer, which keeps tf.data graph building fast)."""

    @tf.function(autograph=False)
    def layer(image, seed):
        s_op, s_apply, s_mag, s_sign = _split(seed, 4)
        op_index = tf.random.stateless_uniform([], s_op, 0, len(names), dtype=tf.int32)
        apply = _uniform(s_apply) < prob
        if math.isinf(magnitude_std):
            mag = _uniform(s_mag, [], 0.0, magnitude)
        elif magnitude_std > 0:
            mag = magnitude + magnitude_std * tf.random.stateless_normal([], s_mag)
        else:
            mag = tf.constant(magnitude, tf.float32)
        mag = tf.clip_by_value(mag, 0.0, magnitude_max)
        branch = tf.where(apply, op_index, len(names))  # last branch = identity

        def make_branch(name):
            def fn():
                out = randaugment_op(
                    name, image, mag, s_sign, fill=fill, translate_pct=translate_pct
                )
                out.set_shape(image.shape)
                return out

            return fn

        branches: list[Callable[[], tf.Tensor]] = [make_branch(n) for n in names]
        branches.append(lambda: tf.identity(image))
        out = tf.switch_case(branch, branches)
        out.set_shape(image.shape)
        return out

    return layer


@_tensor_input
def randaugment(
    image: tf.Tensor,
    seed: tf.Tensor,
    config: RandAugmentConfig | str,
    *,
    fill=(128, 128, 128),
    translate_pct: float = 0.45,
) -> tf.Tensor:
    """RandAugment: ``num_layers`` ops drawn uniformly with replacement; each is
    applied with probability ``prob`` at magnitude ~ N(m, mstd) clipped to
    [0, mmax] (drawn per op). ``fill`` is the colour of uncovered pixels in
    geometric ops."""
    if isinstance(config, str):
        config = parse_randaugment(config)
    layer = _randaugment_layer(
        config.ops,
        float(config.prob),
        float(config.magnitude),
        float(config.magnitude_std),
        float(config.magnitude_max),
        tuple(float(v) for v in fill),
        float(translate_pct),
    )
    seed = tf.convert_to_tensor(seed)
    for i in range(config.num_layers):
        image = layer(image, tf.random.experimental.stateless_fold_in(seed, i))
    return image
