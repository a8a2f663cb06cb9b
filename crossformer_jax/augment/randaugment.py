"""RandAugment on the device: timm's ``rand-...`` recipe applied per example to uint8 batches.

The input pipeline ships random-resized-cropped, flipped uint8 images; the train step runs
RandAugment, normalisation and random erasing on them (``batch_ops.train_images``). On an
accelerator that work is nearly free, and the host keeps up with the device: RandAugment was
the largest per-image cost of a tf.data pipeline (about 2.8 ms of a CPU core per image).

Semantics (timm's ``auto_augment`` module on PIL images): ``num_layers`` ops drawn uniformly
with replacement from the op set; each is applied with probability ``prob`` at magnitude
``m + mstd * N(0, 1)`` (``U(0, m)`` for ``mstd=inf``) clipped to ``[0, mmax]``, with a random
sign for the signed ops. Pixel ops reproduce PIL's integer results (blends truncate, lookup
tables as ``ImageOps`` builds them); geometric ops sample bilinearly (timm asks PIL for bicubic
under the ``interpolation='bicubic'`` recipe) with the fill colour mixed in at the borders.

How it runs on a batch: every op is one of four kinds, an affine warp (Rotate, Shear*,
Translate*), a per-channel lookup table (AutoContrast, Equalize, Invert, Posterize*, Solarize*,
SolarizeAdd, Brightness*, Contrast*), a blend with the greyscale image (Color*) or with the
smoothed image (Sharpness*). A loop over the examples (``lax.map``; per device, inside a
``shard_map``, when the batch is split over a mesh) takes, per layer, the branch of the drawn
op's kind (``lax.switch``), so only that op's work runs; Equalize alone computes histograms.
No per-pixel gathers of single values, which XLA:TPU runs slowly: table lookups and histograms
are exact one-hot contractions, and the affine warp fetches each pixel's 2x2 neighbourhood,
packed in one uint32 per channel, with one gather.

Images inside this module are float32 ``(H, W, 3)`` with integer values in ``[0, 255]``.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

_LEVEL_DENOM = 10.0  # RandAugment magnitudes live on [0, 10].
TRANSLATE_PCT = 0.45  # TranslateXRel/YRel at magnitude 10 move by 45% of the side (timm)

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

ALL_OPS = tuple(sorted(set(INCREASING_OPS + DEFAULT_OPS)))
GEOMETRIC_OPS = ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')


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
        try:
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
        except ValueError:
            raise ValueError(f'Bad value in RandAugment section {part!r} of {spec!r}') from None
    return RandAugmentConfig(**kw)


# ----------------------------------------------------------------------------
# The three kinds of op, on one float32 (H, W, 3) image


def _floor_clip(x: jax.Array) -> jax.Array:
    """PIL's uint8 result of a blend: truncated and clipped to [0, 255]."""
    return jnp.clip(jnp.floor(x), 0.0, 255.0)


def grayscale(image: jax.Array) -> jax.Array:
    """PIL 'L' conversion (ITU-R 601-2 luma, PIL's fixed-point weights): (H, W, 1).

    Every product and sum is an integer below 2**24, so float32 computes it exactly."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    gray = jnp.floor((r * 19595.0 + g * 38470.0 + b * 7471.0 + 32768.0) / 65536.0)
    return gray[..., None]


def smooth(image: jax.Array) -> jax.Array:
    """PIL's SMOOTH filter ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, rounded) inside the image;
    the one-pixel border keeps its pixels (what ``ImageEnhance.Sharpness`` blends with)."""
    h, w, _ = image.shape
    if h < 3 or w < 3:  # all border
        return image
    total = 4.0 * image[1:-1, 1:-1]
    for dy in range(3):
        for dx in range(3):
            total = total + image[dy : dy + h - 2, dx : dx + w - 2]
    inner = jnp.pad(jnp.floor(total / 13.0 + 0.5), ((1, 1), (1, 1), (0, 0)))
    rows = jnp.arange(h)[:, None, None]
    cols = jnp.arange(w)[None, :, None]
    interior = (rows > 0) & (rows < h - 1) & (cols > 0) & (cols < w - 1)
    return jnp.where(interior, inner, image)


def blend(degenerate: jax.Array, image: jax.Array, factor: jax.Array) -> jax.Array:
    """PIL ``Image.blend(degenerate, image, factor)``; factor 1 returns ``image`` exactly."""
    return _floor_clip(degenerate + factor * (image - degenerate))


def _digits(image: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(..., 3) integers v in [0, 255] -> float32 one-hots (..., 3, 16) of v // 16 and v % 16."""
    high = jnp.floor(image / 16.0)
    low = image - 16.0 * high
    digits = jnp.arange(16, dtype=jnp.float32)
    high_hot, low_hot = high[..., None] == digits, low[..., None] == digits
    return high_hot.astype(jnp.float32), low_hot.astype(jnp.float32)


def apply_lut(image: jax.Array, lut: jax.Array) -> jax.Array:
    """``lut[c, image[..., c]]`` per channel; ``lut``: (3, 256) integers in [0, 255].

    One-hot contractions instead of a gather per value: the one-hot of v // 16 picks the table's
    row of 16 entries, the one-hot of v % 16 the entry. Exact: each one-hot has a single 1, the
    entries are exact in bfloat16 and each float32 sum adds one product to zeros."""
    high, low = _digits(image)
    rows = jnp.einsum('hwca,cab->hwcb', high, lut.reshape(3, 16, 16))
    return jnp.sum(low * rows, axis=-1)


def affine(image: jax.Array, matrix: jax.Array, fill: jax.Array) -> jax.Array:
    """PIL-style affine map, bilinear sampling, constant ``fill`` (3,) outside the image.

    ``matrix`` = (a, b, c, d, e, f): output pixel (x, y) takes the input at
    (a x + b y + c, d x + e y + f) in PIL's continuous coordinates (pixel centres at +0.5).
    Each of the four neighbours of a sample outside the image reads the fill colour, so the
    fill is mixed in bilinearly at the border. The unit matrix returns ``image`` exactly.
    """
    h, w, _ = image.shape
    a, b, c, d, e, f = (matrix[i] for i in range(6))
    ys, xs = jnp.meshgrid(
        jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing='ij'
    )
    # PIL coordinates -> pixel-index coordinates (centres at integers).
    sx = a * xs + b * ys + (c + 0.5 * a + 0.5 * b - 0.5)
    sy = d * xs + e * ys + (f + 0.5 * d + 0.5 * e - 0.5)
    x0, y0 = jnp.floor(sx), jnp.floor(sy)
    wx, wy = sx - x0, sy - y0
    # Neighbour k = 2 dy + dx of the sample is input pixel (y0 + dy, x0 + dx).
    xi = x0[..., None] + jnp.array([0.0, 1.0, 0.0, 1.0])
    yi = y0[..., None] + jnp.array([0.0, 0.0, 1.0, 1.0])
    weight = jnp.stack([(1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx], axis=-1)
    valid = (yi >= 0) & (yi <= h - 1) & (xi >= 0) & (xi <= w - 1)
    weight = jnp.where(valid, weight, 0.0)
    # Per channel, the 2x2 neighbourhood whose top-left is each pixel of the zero-padded image,
    # packed in one uint32 (byte k = neighbour k), channel planes first: one gather of a (3, 1)
    # column per output pixel fetches its 12 values. The window's top-left, (y0, x0), is clamped
    # into the padded image; a neighbour that the clamp moves is outside the image (weight 0).
    p = jnp.pad(image, ((1, 1), (1, 1), (0, 0))).astype(jnp.uint32)
    packed = p[:-1, :-1] | (p[:-1, 1:] << 8) | (p[1:, :-1] << 16) | (p[1:, 1:] << 24)
    packed = jnp.moveaxis(packed, -1, 0).reshape(3, (h + 1) * (w + 1))
    top = jnp.clip(y0 + 1, 0, h).astype(jnp.int32)
    left = jnp.clip(x0 + 1, 0, w).astype(jnp.int32)
    window = jnp.take(packed, (top * (w + 1) + left).reshape(-1), axis=1, mode='clip')
    shifts = jnp.arange(4, dtype=jnp.uint32) * 8
    pixels = (window.T.reshape(h, w, 1, 3) >> shifts[:, None]) & 255  # (H, W, 4, 3)
    out = jnp.einsum('hwk,hwkc->hwc', weight, pixels.astype(jnp.float32))
    inside = jnp.sum(weight, axis=-1, keepdims=True)
    out = out + (1.0 - inside) * fill
    return jnp.clip(jnp.floor(out + 0.5), 0.0, 255.0)


def _rotation(degrees: jax.Array, height: int, width: int) -> jax.Array:
    """PIL ``rotate`` (counter-clockwise about the centre) as an affine matrix."""
    angle = -degrees * (math.pi / 180.0)
    a, b = jnp.cos(angle), jnp.sin(angle)
    d, e = -jnp.sin(angle), jnp.cos(angle)
    cx, cy = width / 2.0, height / 2.0
    return jnp.stack([a, b, a * -cx + b * -cy + cx, d, e, d * -cx + e * -cy + cy])


# ----------------------------------------------------------------------------
# Lookup tables (PIL ImageOps / ImageEnhance)

# A NumPy constant: a jnp array here would start the XLA backend when the module is imported
# (before a multi-process run's jax.distributed.initialize).
_VALUES = np.arange(256, dtype=np.float32)


def _histograms(image: jax.Array) -> jax.Array:
    """(3, 256) int32 per-channel histograms of an integer-valued image: count of v = 16 a + b
    is the product of the one-hots of a and b summed over the pixels (exact in float32 up to
    2**24 pixels)."""
    high, low = _digits(image.reshape(-1, 3))
    counts = jnp.einsum('pca,pcb->cab', high, low)
    return counts.reshape(3, 256).astype(jnp.int32)


def _equalize_lut(image: jax.Array) -> jax.Array:
    """``ImageOps.equalize``: per channel, step = (pixels - count of the top value) // 255;
    value v -> (step // 2 + pixels below v) // step, identity where step is 0."""
    hist = _histograms(image)
    top = jnp.max(image, axis=(0, 1)).astype(jnp.int32)
    top_count = jnp.take_along_axis(hist, top[:, None], axis=1)[:, 0]
    step = (jnp.sum(hist, axis=1) - top_count) // 255
    below = jnp.cumsum(hist, axis=1) - hist
    lut = (step[:, None] // 2 + below) // jnp.maximum(step, 1)[:, None]
    lut = jnp.clip(lut, 0, 255).astype(jnp.float32)
    return jnp.where((step > 0)[:, None], lut, _VALUES)


def _auto_contrast_lut(image: jax.Array) -> jax.Array:
    """``ImageOps.autocontrast`` (cutoff 0): per channel [min, max] -> [0, 255]; a constant
    channel is left as it is."""
    lo = jnp.min(image, axis=(0, 1))[:, None]
    hi = jnp.max(image, axis=(0, 1))[:, None]
    span = hi - lo
    stretched = _floor_clip((_VALUES - lo) * 255.0 / jnp.where(span > 0, span, 1.0))
    return jnp.where(span > 0, stretched, _VALUES)


def _posterize_lut(bits: jax.Array) -> jax.Array:
    """Keeps the ``bits`` most significant bits (0 bits -> black)."""
    shift = jnp.clip(8 - bits, 0, 8).astype(jnp.int32)
    values = jnp.arange(256, dtype=jnp.int32)
    return jnp.broadcast_to((values >> shift << shift).astype(jnp.float32), (3, 256))


def _enhance_factors(level: jax.Array, sign: jax.Array) -> tuple[jax.Array, jax.Array]:
    """ImageEnhance factor of the plain (0.1 + 1.8 level) and the *Increasing (1 +- 0.9 level)
    Color, Contrast, Brightness and Sharpness ops."""
    return level * 1.8 + 0.1, 1.0 + sign * level * 0.9


def _tables(image: jax.Array, level: jax.Array, sign: jax.Array) -> dict[str, jax.Array]:
    """The (3, 256) table of every lookup-table op but Equalize at ``level`` = magnitude / 10."""
    v = jnp.broadcast_to(_VALUES, (3, 256))
    solarize_threshold = jnp.floor(level * 256.0)
    posterize_bits = jnp.floor(level * 4.0).astype(jnp.int32)
    contrast_mean = jnp.floor(jnp.mean(grayscale(image)) + 0.5)
    plain_factor, increasing_factor = _enhance_factors(level, sign)
    return {
        'AutoContrast': _auto_contrast_lut(image),
        'Invert': 255.0 - v,
        'Posterize': _posterize_lut(posterize_bits),
        'PosterizeIncreasing': _posterize_lut(4 - posterize_bits),
        'Solarize': jnp.where(v >= solarize_threshold, 255.0 - v, v),
        'SolarizeIncreasing': jnp.where(v >= 256.0 - solarize_threshold, 255.0 - v, v),
        'SolarizeAdd': jnp.where(v < 128.0, jnp.minimum(v + jnp.floor(level * 110.0), 255.0), v),
        'Brightness': _floor_clip(plain_factor * v),
        'BrightnessIncreasing': _floor_clip(increasing_factor * v),
        'Contrast': blend(contrast_mean, v, plain_factor),
        'ContrastIncreasing': blend(contrast_mean, v, increasing_factor),
    }


def _matrices(level: jax.Array, sign: jax.Array, height: int, width: int) -> dict:
    """The affine matrix of every geometric op at ``level`` = magnitude / 10."""
    shear = sign * level * 0.3
    zero, one = jnp.zeros(()), jnp.ones(())
    return {
        'Rotate': _rotation(sign * level * 30.0, height, width),
        'ShearX': jnp.stack([one, shear, zero, zero, one, zero]),
        'ShearY': jnp.stack([one, zero, zero, shear, one, zero]),
        'TranslateXRel': jnp.stack(
            [one, zero, sign * level * TRANSLATE_PCT * width, zero, one, zero]
        ),
        'TranslateYRel': jnp.stack(
            [one, zero, zero, zero, one, sign * level * TRANSLATE_PCT * height]
        ),
    }


def _pick(chosen: jax.Array, names: tuple[str, ...], values: dict, default: jax.Array):
    """``values[names[chosen]]`` where that op has an entry, else ``default``."""
    out = default
    for i, name in enumerate(names):
        if name in values:
            out = jnp.where(chosen == i, values[name], out)
    return out


def apply_op(
    image: jax.Array,
    chosen: jax.Array,
    magnitude: jax.Array,
    sign: jax.Array,
    names: tuple[str, ...],
    fill: jax.Array,
) -> jax.Array:
    """Applies op ``names[chosen]`` (none when ``chosen`` is outside the range) to one image.

    ``image``: float32 (H, W, 3) integer values; ``chosen``: scalar; ``magnitude`` on the 0..10
    scale; ``sign`` +-1 for the signed ops (Rotate, Shear*, Translate*, the *Increasing enhance
    ops). Magnitude-to-argument mapping (timm): Rotate 30 deg * m/10; Shear 0.3 * m/10;
    TranslateRel 0.45 * side * m/10; PosterizeIncreasing bits 4 - int(4 m/10); Posterize bits
    int(4 m/10); SolarizeIncreasing threshold 256 - int(256 m/10); Solarize threshold
    int(256 m/10); SolarizeAdd add int(110 m/10) below 128; *Increasing enhance factor
    1 +- 0.9 m/10; plain enhance factor 0.1 + 1.8 m/10. Only the branch of the op's kind runs.
    """
    h, w, _ = image.shape
    level = magnitude / _LEVEL_DENOM
    plain, increasing = _enhance_factors(level, sign)

    def lookup(image):
        lut = _pick(chosen, names, _tables(image, level, sign), jnp.broadcast_to(_VALUES, (3, 256)))
        is_equalize = _pick(chosen, names, {'Equalize': True}, False)
        lut = jax.lax.cond(is_equalize, _equalize_lut, lambda _: lut, image)
        return apply_lut(image, lut)

    def geometric(image):
        identity = jnp.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
        return affine(image, _pick(chosen, names, _matrices(level, sign, h, w), identity), fill)

    def color(image):
        factor = _pick(chosen, names, {'Color': plain, 'ColorIncreasing': increasing}, 1.0)
        return blend(grayscale(image), image, factor)

    def sharpness(image):
        factor = _pick(chosen, names, {'Sharpness': plain, 'SharpnessIncreasing': increasing}, 1.0)
        return blend(smooth(image), image, factor)

    # The branch: 0 not applied, 1 lookup table, 2 affine warp, 3 colour, 4 sharpness.
    kind = _pick(chosen, names, dict.fromkeys(GEOMETRIC_OPS, 2), 1)
    kind = _pick(chosen, names, {'Color': 3, 'ColorIncreasing': 3}, kind)
    kind = _pick(chosen, names, {'Sharpness': 4, 'SharpnessIncreasing': 4}, kind)
    kind = jnp.where(chosen < len(names), kind, 0)
    return jax.lax.switch(kind, [lambda image: image, lookup, geometric, color, sharpness], image)


_apply_op_jit = jax.jit(apply_op, static_argnames='names')


def randaugment_op(name: str, image, magnitude: float, sign: float = 1.0, fill=(128, 128, 128)):
    """One named op on one image (uint8 or integer-valued float (H, W, 3)); returns uint8."""
    if name not in ALL_OPS:
        raise ValueError(f'Unknown RandAugment op {name!r}; ops: {ALL_OPS}')
    x = jnp.asarray(image).astype(jnp.float32)
    out = _apply_op_jit(
        x,
        jnp.asarray(ALL_OPS.index(name)),
        jnp.asarray(magnitude, jnp.float32),
        jnp.asarray(sign, jnp.float32),
        ALL_OPS,
        jnp.asarray(fill, jnp.float32),
    )
    return out.astype(jnp.uint8)


# ----------------------------------------------------------------------------
# The batch transform


def _draw_layer(key: jax.Array, config: RandAugmentConfig):
    """(op index, magnitude, sign) of one layer for one example; index len(ops) = not applied."""
    k_op, k_apply, k_magnitude, k_sign = jax.random.split(key, 4)
    num_ops = len(config.ops)
    op = jax.random.randint(k_op, (), 0, num_ops)
    apply = jax.random.uniform(k_apply) < config.prob
    if math.isinf(config.magnitude_std):
        magnitude = jax.random.uniform(k_magnitude, (), maxval=config.magnitude)
    elif config.magnitude_std > 0:
        magnitude = config.magnitude + config.magnitude_std * jax.random.normal(k_magnitude)
    else:
        magnitude = jnp.asarray(config.magnitude, jnp.float32)
    magnitude = jnp.clip(magnitude, 0.0, config.magnitude_max)
    sign = jnp.where(jax.random.uniform(k_sign) < 0.5, -1.0, 1.0)
    return jnp.where(apply, op, num_ops), magnitude, sign


def randaugment(
    images: jax.Array,
    rng: jax.Array,
    config: RandAugmentConfig | str,
    fill=(128, 128, 128),
    mesh: Mesh | None = None,
) -> jax.Array:
    """RandAugment of a batch: (B, H, W, 3) uint8 or integer-valued float -> float32 (B, H, W, 3)
    with integer values. Example ``i``, layer ``l`` draws from ``fold_in(fold_in(rng, i), l)``;
    ``fill``: colour of the pixels geometric ops uncover. With ``mesh`` (the batch split over
    all its axes), each device loops over its own examples."""
    if isinstance(config, str):
        config = parse_randaugment(config)
    fill = jnp.asarray(fill, jnp.float32)

    def one(example):
        image, key = example
        image = image.astype(jnp.float32)
        for index in range(config.num_layers):
            chosen, magnitude, sign = _draw_layer(jax.random.fold_in(key, index), config)
            image = apply_op(image, chosen, magnitude, sign, config.ops, fill)
        return image

    def loop(images, keys):
        return jax.lax.map(one, (images, keys))

    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(images.shape[0]))
    if mesh is None:
        return loop(images, keys)
    batch = P(mesh.axis_names)
    return jax.shard_map(loop, mesh=mesh, in_specs=(batch, batch), out_specs=batch)(images, keys)
