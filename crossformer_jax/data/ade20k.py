"""Semantic segmentation examples (ADE20K): the tf.data augmentation and per-example functions.

Images come from ``sources.ADE20KSource`` (DATA_DIR/{images,annotations}/<split>/; per-host
sharding, deterministic epoch order, exact resume, corrupt files skipped and counted by
crossformer_jax.data.pipeline); the functions below are the task's per-example preprocessing.
The ``config.data`` fields read default as in ``ADE20K_DEFAULTS`` (crossformer_jax.data.config).

Labels are "reduce zero label": PNG value 0 becomes IGNORE_INDEX (255) and v becomes v - 1.

Training (every random draw from one stateless seed per example, so image and labels see the same
draws and resumed runs repeat them): random rescale with ratio r ~ U(ratio_range) to fit
(int(long * r), int(short * r)) of `scale`, bilinear for the image (rounded back to uint8) and
nearest for the labels; a random crop of image_size x image_size redrawn (at most 10 draws, the
last kept unchecked) while it holds fewer than two labelled classes or one class covers at least
cat_max_ratio of its labelled pixels; horizontal flip (p 0.5); photometric distortion; normalise;
pad to image_size with 0 (image) and 255 (labels).

Evaluation ("whole" image): for each ratio of `eval.scales` the image is resized keeping its ratio
to fit (int(long * r), int(short * r)), then to the next multiples of 32; the labels stay at the
original size (the task resizes the logits back to it).
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from crossformer_jax.data import pipeline
from crossformer_jax.data.config import ADE20K_DEFAULTS, data_field
from crossformer_jax.data.sources import SEGMENTATION_AUGMENT_DOMAIN, element_key, shard_key

IGNORE_INDEX = 255


# ----------------------------------------------------------------------------
# Ops (image uint8 (H, W, 3), labels uint8 (H, W))


def reduce_zero_label(label: tf.Tensor) -> tf.Tensor:
    """0 -> IGNORE_INDEX, v -> v - 1 (uint8)."""
    label = tf.cast(label, tf.int32)
    return tf.cast(tf.where(label == 0, IGNORE_INDEX, label - 1), tf.uint8)


def rescale_size(height, width, scale: Sequence[int], ratio=1.0) -> tuple[tf.Tensor, tf.Tensor]:
    """(new height, new width) fitting (int(long * ratio), int(short * ratio)) of scale, with the
    image's aspect ratio kept: factor = min(long target / long side, short target / short side),
    new side = int(side * factor + 0.5)."""
    ratio = tf.cast(ratio, tf.float64)
    long_target = tf.floor(float(max(scale)) * ratio)
    short_target = tf.floor(float(min(scale)) * ratio)
    h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    factor = tf.minimum(long_target / tf.maximum(h, w), short_target / tf.minimum(h, w))
    new_h = tf.cast(tf.floor(h * factor + 0.5), tf.int32)
    new_w = tf.cast(tf.floor(w * factor + 0.5), tf.int32)
    return tf.maximum(new_h, 1), tf.maximum(new_w, 1)


def resize_bilinear_uint8(image: tf.Tensor, height, width) -> tf.Tensor:
    """Bilinear with half-pixel centres and no antialiasing (OpenCV INTER_LINEAR), to uint8."""
    out = tf.image.resize(tf.cast(image, tf.float32), tf.stack([height, width]), 'bilinear')
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def resize_nearest(label: tf.Tensor, height, width) -> tf.Tensor:
    """Nearest neighbour as OpenCV INTER_NEAREST: source index floor(dst * in / out)."""
    in_h, in_w = tf.shape(label)[0], tf.shape(label)[1]

    def indices(out_size, in_size):
        scale = tf.cast(in_size, tf.float64) / tf.cast(out_size, tf.float64)
        idx = tf.cast(tf.floor(tf.cast(tf.range(out_size), tf.float64) * scale), tf.int32)
        return tf.minimum(idx, in_size - 1)

    rows = tf.gather(label, indices(height, in_h), axis=0)
    return tf.gather(rows, indices(width, in_w), axis=1)


def random_rescale(image, label, seed, *, scale: Sequence[int], ratio_range: Sequence[float]):
    """Rescale image (bilinear) and labels (nearest) by one ratio r ~ U(ratio_range)."""
    ratio = tf.random.stateless_uniform(
        [], seed, minval=ratio_range[0], maxval=ratio_range[1], dtype=tf.float64
    )
    h, w = rescale_size(tf.shape(image)[0], tf.shape(image)[1], scale, ratio)
    return resize_bilinear_uint8(image, h, w), resize_nearest(label, h, w)


def _crop_acceptable(label: tf.Tensor, cat_max_ratio: float) -> tf.Tensor:
    """At least two labelled classes, none covering cat_max_ratio or more of the labelled pixels."""
    counts = tf.math.bincount(tf.cast(tf.reshape(label, [-1]), tf.int32), minlength=256)
    counts = counts[:IGNORE_INDEX]
    present = tf.reduce_sum(tf.cast(counts > 0, tf.int32))
    total = tf.maximum(tf.reduce_sum(counts), 1)
    largest = tf.cast(tf.reduce_max(counts), tf.float64) / tf.cast(total, tf.float64)
    return tf.logical_and(present > 1, largest < cat_max_ratio)


def random_crop(image, label, seed, *, size: int, cat_max_ratio: float, max_tries: int = 10):
    """A size x size crop (smaller where the image is), the same window for image and labels.

    Draw k takes offsets from seed k; the first acceptable draw of the first max_tries - 1 is
    used, else the last one (unchecked). cat_max_ratio >= 1 takes the first draw.
    """
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    crop_h, crop_w = tf.minimum(h, size), tf.minimum(w, size)
    seeds = tf.random.experimental.stateless_split(seed, max_tries)
    offsets = [
        (
            tf.random.stateless_uniform([], seeds[k], maxval=h - crop_h + 1, dtype=tf.int32),
            tf.random.stateless_uniform(
                [], tf.reverse(seeds[k], [0]), maxval=w - crop_w + 1, dtype=tf.int32
            ),
        )
        for k in range(max_tries)
    ]
    chosen_y, chosen_x = offsets[-1]
    if cat_max_ratio < 1.0:
        # Walk back from the last draw so the earliest acceptable one wins.
        for y, x in reversed(offsets[:-1]):
            ok = _crop_acceptable(label[y : y + crop_h, x : x + crop_w], cat_max_ratio)
            chosen_y = tf.where(ok, y, chosen_y)
            chosen_x = tf.where(ok, x, chosen_x)
    else:
        chosen_y, chosen_x = offsets[0]
    window = (slice(chosen_y, chosen_y + crop_h), slice(chosen_x, chosen_x + crop_w))
    return image[window], label[window]


def _convert(x: tf.Tensor, alpha=1.0, beta=0.0) -> tf.Tensor:
    """x * alpha + beta, clipped to 0..255 and truncated to uint8 (one distortion step)."""
    y = tf.cast(x, tf.float32) * tf.cast(alpha, tf.float32) + tf.cast(beta, tf.float32)
    return tf.cast(tf.clip_by_value(y, 0.0, 255.0), tf.uint8)


def photometric_distortion(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Brightness, contrast (before or after the colour steps), saturation, hue; each with p 0.5.

    brightness + U(-32, 32); contrast and saturation x U(0.5, 1.5); hue + an integer in
    [-18, 17] in OpenCV's 0..179 hue units. Saturation and hue act on an HSV image with OpenCV's
    uint8 ranges (H 0..179, S and V 0..255).
    """
    s = tf.random.experimental.stateless_split(seed, 10)
    coin = [tf.random.stateless_uniform([], s[k]) < 0.5 for k in range(5)]
    delta = tf.random.stateless_uniform([], s[5], -32.0, 32.0)
    contrast = tf.random.stateless_uniform([], s[6], 0.5, 1.5)
    saturation = tf.random.stateless_uniform([], s[7], 0.5, 1.5)
    hue_shift = tf.random.stateless_uniform([], s[8], -18, 18, dtype=tf.int32)
    contrast_first = tf.random.stateless_uniform([], s[9]) < 0.5

    image = tf.cond(coin[0], lambda: _convert(image, beta=delta), lambda: image)
    image = tf.cond(
        tf.logical_and(contrast_first, coin[1]), lambda: _convert(image, contrast), lambda: image
    )

    def colour(image):
        hsv = tf.image.rgb_to_hsv(tf.cast(image, tf.float32) / 255.0)
        hue = tf.math.floormod(tf.round(hsv[..., 0] * 180.0), 180.0)
        sat = tf.round(hsv[..., 1] * 255.0)
        val = tf.cast(tf.reduce_max(image, axis=-1), tf.float32)
        sat = tf.cond(coin[2], lambda: tf.cast(_convert(sat, saturation), tf.float32), lambda: sat)
        hue = tf.cond(
            coin[3],
            lambda: tf.math.floormod(hue + tf.cast(hue_shift, tf.float32), 180.0),
            lambda: hue,
        )
        rgb = tf.image.hsv_to_rgb(tf.stack([hue / 180.0, sat / 255.0, val / 255.0], axis=-1))
        return tf.cast(tf.clip_by_value(tf.round(rgb * 255.0), 0.0, 255.0), tf.uint8)

    image = tf.cond(tf.logical_or(coin[2], coin[3]), lambda: colour(image), lambda: image)
    return tf.cond(
        tf.logical_and(tf.logical_not(contrast_first), coin[4]),
        lambda: _convert(image, contrast),
        lambda: image,
    )


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """(image - mean) / std on 0..255 RGB values; float32."""
    return (tf.cast(image, tf.float32) - tf.constant(mean, tf.float32)) / tf.constant(
        std, tf.float32
    )


def pad_to(image: tf.Tensor, label: tf.Tensor, size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Pads bottom/right to size x size: 0 for the (normalised) image, IGNORE_INDEX for labels."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    paddings = [[0, size - h], [0, size - w]]
    image = tf.pad(image, [*paddings, [0, 0]])
    label = tf.pad(label, paddings, constant_values=IGNORE_INDEX)
    return tf.ensure_shape(image, [size, size, 3]), tf.ensure_shape(label, [size, size])


def _round_up_32(x: tf.Tensor) -> tf.Tensor:
    return (x + 31) // 32 * 32


# ----------------------------------------------------------------------------
# Per-example preprocessing (tasks.segmentation hands these to the input pipeline)


def train_preprocess(cfg, seed: int, process_index: int):
    """Decoded element {'image', 'label' (PNG values), ...} -> {'image' (S, S, 3) float32,
    'label' (S, S) int32 with IGNORE_INDEX, 'id'}; S = config.data.image_size."""
    size = int(data_field(cfg, 'image_size', ADE20K_DEFAULTS))
    scale = tuple(data_field(cfg, 'scale', ADE20K_DEFAULTS))
    ratio_range = tuple(data_field(cfg, 'ratio_range', ADE20K_DEFAULTS))
    cat_max_ratio = float(data_field(cfg, 'cat_max_ratio', ADE20K_DEFAULTS))
    hflip = bool(data_field(cfg, 'hflip'))
    distort = bool(data_field(cfg, 'photometric_distortion', ADE20K_DEFAULTS))
    reduce_zero = bool(data_field(cfg, 'reduce_zero_label', ADE20K_DEFAULTS))
    mean = tuple(data_field(cfg, 'mean', ADE20K_DEFAULTS))
    std = tuple(data_field(cfg, 'std', ADE20K_DEFAULTS))
    key = shard_key(seed, process_index, SEGMENTATION_AUGMENT_DOMAIN)

    def fn(el):
        s = element_key(key, el)
        s_scale, s_crop, s_flip, s_photo = tf.unstack(tf.random.experimental.stateless_split(s, 4))
        image, label = el['image'], el['label']
        if reduce_zero:
            label = reduce_zero_label(label)
        image, label = random_rescale(image, label, s_scale, scale=scale, ratio_range=ratio_range)
        image, label = random_crop(image, label, s_crop, size=size, cat_max_ratio=cat_max_ratio)
        if hflip:
            flip = tf.random.stateless_uniform([], s_flip) < 0.5
            image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
            label = tf.cond(flip, lambda: tf.reverse(label, [1]), lambda: label)
        if distort:
            image = photometric_distortion(image, s_photo)
        image, label = pad_to(normalize(image, mean, std), label, size)
        return {
            'image': image,
            'label': tf.cast(label, tf.int32),
            'id': el['id'],
        }

    return fn


def eval_preprocess(cfg, scales: Sequence[float]):
    """Decoded element -> {'images': one (h_r, w_r, 3) float32 image per ratio r of scales,
    'label' (H, W) int32 at the original size with IGNORE_INDEX, 'id'}."""
    scale = tuple(data_field(cfg, 'scale', ADE20K_DEFAULTS))
    reduce_zero = bool(data_field(cfg, 'reduce_zero_label', ADE20K_DEFAULTS))
    mean = tuple(data_field(cfg, 'mean', ADE20K_DEFAULTS))
    std = tuple(data_field(cfg, 'std', ADE20K_DEFAULTS))

    def fn(el):
        image, label = el['image'], el['label']
        if reduce_zero:
            label = reduce_zero_label(label)
        images = []
        for ratio in scales:
            h, w = rescale_size(tf.shape(image)[0], tf.shape(image)[1], scale, ratio)
            resized = resize_bilinear_uint8(image, h, w)
            resized = tf.image.resize(
                tf.cast(resized, tf.float32), tf.stack([_round_up_32(h), _round_up_32(w)])
            )
            images.append(normalize(resized, mean, std))
        return {
            'images': tuple(images),
            'label': tf.cast(label, tf.int32),
            'id': el['id'],
        }

    return fn


def create_eval_examples(
    data_config, *, scales: Sequence[float], process_index: int = 0, process_count: int = 1
) -> pipeline.ExampleIterator:
    """One pass over this process's shard of the eval split, one example at a time (numpy
    dicts of eval_preprocess); corrupt files are skipped, counted and named."""
    return pipeline.create_eval_examples(
        data_config,
        preprocess=eval_preprocess(data_config, scales),
        process_index=process_index,
        process_count=process_count,
    )
