"""Semantic segmentation data: the ADE20K folder source and the tf.data augmentation.

Layout (ADEChallengeData2016)::

    DATA_DIR/images/<split>/<stem>.jpg
    DATA_DIR/annotations/<split>/<stem>.png     # one channel: 0 = other, 1..K = classes

Labels are "reduce zero label": PNG value 0 becomes IGNORE_INDEX (255) and v becomes v - 1. The
source plugs into crossformer_jax.input_pipeline (per-host sharding, deterministic epoch order,
exact resume, corrupt files skipped and counted); the functions below are the task's per-example
preprocessing.

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

import os
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from crossformer_jax import input_pipeline

IGNORE_INDEX = 255
ADE20K_MEAN = (123.675, 116.28, 103.53)  # RGB, 0..255
ADE20K_STD = (58.395, 57.12, 57.375)
_SEG_AUGMENT_DOMAIN = 3


# ----------------------------------------------------------------------------
# Source


def _list_ade20k(root: str, split: str) -> tuple[list[str], list[str]]:
    """Sorted (image paths, annotation paths) of one split; every image needs its annotation."""
    image_dir = os.path.join(root, 'images', split)
    label_dir = os.path.join(root, 'annotations', split)
    for path in (image_dir, label_dir):
        if not tf.io.gfile.isdir(path):
            raise FileNotFoundError(f'segmentation split folder not found: {path}')
    labels = {
        os.path.splitext(n)[0]: n for n in tf.io.gfile.listdir(label_dir) if n.endswith('.png')
    }
    images, annotations, missing = [], [], []
    for name in sorted(tf.io.gfile.listdir(image_dir)):
        if name.startswith('.') or not name.lower().endswith(input_pipeline.IMAGE_EXTENSIONS):
            continue
        stem = os.path.splitext(name)[0]
        if stem not in labels:
            missing.append(name)
            continue
        images.append(os.path.join(image_dir, name))
        annotations.append(os.path.join(label_dir, labels[stem]))
    if missing:
        raise ValueError(
            f'{len(missing)} image(s) of {image_dir} have no <stem>.png in {label_dir}, '
            f'e.g. {missing[0]}'
        )
    return images, annotations


class ADE20KSource(input_pipeline._FolderSource):
    """Image + annotation pairs of DATA_DIR/{images,annotations}/<split>/; files i, i+n, ... of
    the sorted list on process i of n, the epoch order and resume of the image-folder source."""

    def __init__(self, cfg, split: str, process_index: int, process_count: int):
        images, annotations = _list_ade20k(input_pipeline._get(cfg, 'data_dir'), split)
        self.total_examples = len(images)
        self.max_shard_examples = -(-len(images) // process_count)
        self.paths = np.asarray(images, dtype=object)[process_index::process_count]
        self.labels = np.asarray(annotations, dtype=object)[process_index::process_count]
        self.num_examples = len(self.paths)

    def _elements(self, index: tf.Tensor, paths: tf.Tensor, labels: tf.Tensor):
        path = tf.gather(paths, index)
        return {'data': path, 'label_data': tf.gather(labels, index), 'id': path}


def ade20k_info(cfg) -> input_pipeline.DatasetInfo:
    """config.data.num_classes classes; examples counted in both splits (0 if absent)."""
    root = input_pipeline._get(cfg, 'data_dir')

    def count(split):
        if not tf.io.gfile.isdir(os.path.join(root, 'images', split)):
            return 0
        return len(_list_ade20k(root, split)[0])

    return input_pipeline.DatasetInfo(
        int(input_pipeline._get(cfg, 'num_classes')),
        count(input_pipeline._get(cfg, 'train_split', 'training')),
        count(input_pipeline._get(cfg, 'eval_split', 'validation')),
    )


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
    get = input_pipeline._get
    size = int(get(cfg, 'image_size'))
    scale = tuple(get(cfg, 'scale'))
    ratio_range = tuple(get(cfg, 'ratio_range', (0.5, 2.0)))
    cat_max_ratio = float(get(cfg, 'cat_max_ratio', 0.75))
    hflip = bool(get(cfg, 'hflip', True))
    distort = bool(get(cfg, 'photometric_distortion', True))
    reduce_zero = bool(get(cfg, 'reduce_zero_label', True))
    mean, std = tuple(get(cfg, 'mean')), tuple(get(cfg, 'std'))
    key = input_pipeline._shard_key(seed, process_index, _SEG_AUGMENT_DOMAIN)

    def fn(el):
        s = tf.random.experimental.stateless_fold_in(
            tf.random.experimental.stateless_fold_in(key, el['epoch']), el['position']
        )
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
    get = input_pipeline._get
    scale = tuple(get(cfg, 'scale'))
    reduce_zero = bool(get(cfg, 'reduce_zero_label', True))
    mean, std = tuple(get(cfg, 'mean')), tuple(get(cfg, 'std'))

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
):
    """One pass over this process's shard of the eval split, one example at a time (numpy
    dicts of eval_preprocess); corrupt files are skipped, counted and named."""
    cfg = data_config
    split = input_pipeline._get(cfg, 'eval_split', 'validation')
    source = input_pipeline._make_source(cfg, split, process_index, process_count)
    parallel = input_pipeline._parallel(cfg)
    ds = input_pipeline.numbered_examples(
        source.eval_stream(cfg),
        input_pipeline.decode_whole(source.load),
        eval_preprocess(cfg, scales),
        parallel,
    )
    ds = ds.prefetch(int(input_pipeline._get(cfg, 'prefetch', 2)))
    return _ExampleIterator(
        ds.with_options(input_pipeline._options(cfg)),
        input_pipeline._stream_ids(lambda seq: source.eval_stream(cfg).skip(seq)),
        source.num_examples,
    )


class _ExampleIterator(input_pipeline._BaseIterator):
    """The examples that decoded, in shard order (with ``seq``); the corrupt ones (numbers
    missing between them, or after the last) are recorded like the batched iterators do."""

    def __init__(self, ds, ids_at, num_examples: int):
        super().__init__(ds, True, ids_at)
        self._next = 0
        self._num_examples = num_examples

    def __next__(self):
        try:
            example = next(self._it)
        except StopIteration:
            self._skip_to(self._num_examples)
            raise
        self._skip_to(int(example['seq']))
        self._next += 1
        return example

    def _skip_to(self, seq: int) -> None:
        if seq > self._next:
            self._record_corrupt(np.arange(self._next, seq))
        self._next = max(self._next, seq)
