"""On-device batch ops: RandAugment, normalisation and random erasing of the uint8 batches.

The tf.data pipeline (``crossformer_jax.data.pipeline``) ships cropped, resized and flipped
uint8 images (a quarter of the bytes of float32) and leaves the per-pixel steps of the recipe
to the accelerator, in timm's order:

* ``randaugment.randaugment``: per example, timm's ``rand-...`` RandAugment on the uint8 pixels;
* ``normalize``: ``(x / 255 - mean) / std`` in float32, mean/std on the [0, 1] scale;
* ``random_erasing``: per example, timm's ``RandomErasing`` in 'pixel' mode with one box.

``train_images`` / ``eval_images`` are what a train / eval step calls; they read
``randaugment``, ``randaugment_fill``, ``mean``, ``std`` and ``random_erasing_prob`` from the
data config (defaults: ``crossformer_jax.data.config.DATA_DEFAULTS``). All randomness comes
from the key passed in (in the trainer: the step's key), so a batch is augmented the same way
whenever step ``k`` is run, which keeps resumed runs exact.
Shapes are static; everything jit-compiles.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from crossformer_jax.augment import randaugment
from crossformer_jax.data.config import IMAGENET_MEAN, IMAGENET_STD, data_field


def normalize(images: jax.Array, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> jax.Array:
    """(..., 3) pixels in [0, 255] (uint8 or float) -> float32 ``(x / 255 - mean) / std``."""
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _erase_one(
    image: jax.Array,
    rng: jax.Array,
    prob: float,
    min_area: float,
    max_area: float,
    min_aspect: float,
    max_aspect: float,
    attempts: int,
) -> jax.Array:
    height, width, _ = image.shape
    k_apply, k_area, k_aspect, k_top, k_left, k_noise = jax.random.split(rng, 6)
    apply = jax.random.uniform(k_apply) < prob
    area = (
        height * width * jax.random.uniform(k_area, (attempts,), minval=min_area, maxval=max_area)
    )
    log_aspect = jax.random.uniform(
        k_aspect, (attempts,), minval=math.log(min_aspect), maxval=math.log(max_aspect)
    )
    aspect = jnp.exp(log_aspect)
    box_h = jnp.round(jnp.sqrt(area * aspect))  # round half to even, as Python's round
    box_w = jnp.round(jnp.sqrt(area / aspect))
    fits = (box_w < width) & (box_h < height)
    first = jnp.argmax(fits)
    bh = box_h[first].astype(jnp.int32)
    bw = box_w[first].astype(jnp.int32)
    # Uniform integers in [0, H - bh] and [0, W - bw].
    top = jnp.floor(jax.random.uniform(k_top) * (height - bh + 1)).astype(jnp.int32)
    left = jnp.floor(jax.random.uniform(k_left) * (width - bw + 1)).astype(jnp.int32)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    box = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
    box = box & apply & jnp.any(fits)
    noise = jax.random.normal(k_noise, image.shape, image.dtype)
    return jnp.where(box[:, :, None], noise, image)


def random_erasing(
    images: jax.Array,
    rng: jax.Array,
    *,
    prob: float = 0.25,
    min_area: float = 0.02,
    max_area: float = 1 / 3,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    attempts: int = 10,
) -> jax.Array:
    """Random erasing, 'pixel' mode, one box per example (timm ``RandomErasing`` semantics).

    ``images``: normalised float (B, H, W, C). Example ``i`` uses key ``fold_in(rng, i)``: with
    probability ``prob``, up to ``attempts`` draws of area fraction ~ U(min_area, max_area) and
    log aspect ~ U(log min_aspect, log max_aspect); box height ``round(sqrt(area * aspect))``,
    width ``round(sqrt(area / aspect))``; the first box strictly smaller than the image is placed
    uniformly and filled with per-pixel, per-channel N(0, 1) noise. Returns (B, H, W, C).
    """
    if prob <= 0:
        return images
    max_aspect = max_aspect or 1.0 / min_aspect
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(images.shape[0]))
    erase = jax.vmap(
        lambda image, key: _erase_one(
            image, key, prob, min_area, max_area, min_aspect, max_aspect, attempts
        )
    )
    return erase(images, keys)


def randaugment_fill(data_config: Any) -> tuple[float, float, float]:
    """``randaugment_fill`` of the data config; None (default): ``round(255 * mean)``, the fill
    of timm's training transform."""
    fill = data_field(data_config, 'randaugment_fill')
    if fill is None:
        fill = tuple(min(255, round(255 * m)) for m in data_field(data_config, 'mean'))
    if len(fill) != 3:
        raise ValueError(f'config.data.randaugment_fill must be 3 values, got {fill!r}')
    return tuple(float(v) for v in fill)


def randaugment_config(data_config: Any) -> randaugment.RandAugmentConfig | None:
    """The parsed ``randaugment`` spec of the data config; None when it is ''. Raises
    ValueError naming the bad section."""
    spec = data_field(data_config, 'randaugment') or ''
    return randaugment.parse_randaugment(spec) if spec else None


def train_images(
    images: jax.Array, rng: jax.Array, data_config: Any, mesh: Mesh | None = None
) -> jax.Array:
    """uint8 (B, H, W, 3) training batch -> RandAugmented, normalised, randomly erased float32
    (B, H, W, 3). RandAugment draws from ``fold_in(rng, 0)``, erasing from ``fold_in(rng, 1)``;
    ``mesh``: the one the batch is split over (each device RandAugments its own examples)."""
    x = images
    ra_config = randaugment_config(data_config)
    if ra_config is not None:
        x = randaugment.randaugment(
            x, jax.random.fold_in(rng, 0), ra_config, randaugment_fill(data_config), mesh
        )
    x = normalize(x, data_field(data_config, 'mean'), data_field(data_config, 'std'))
    return random_erasing(
        x,
        jax.random.fold_in(rng, 1),
        prob=float(data_field(data_config, 'random_erasing_prob')),
    )


def eval_images(images: jax.Array, data_config: Any) -> jax.Array:
    """uint8 (B, H, W, 3) evaluation batch -> normalised float32 (B, H, W, 3)."""
    return normalize(images, data_field(data_config, 'mean'), data_field(data_config, 'std'))
