"""Classification examples: the per-example tf.data functions the input pipeline uses by default.

Examples are ``{'image' uint8 (S, S, 3), 'label' int32 (), 'id'}`` with S =
``config.data.image_size``. Training: the image is decoded whole and cropped to a random resized
crop window (``preprocess_ops.decode_random_crop``; decoding only the window of a JPEG measured
slower on ImageNet-sized photos), resized and flipped; evaluation: the short side is resized to
``floor(S / eval_crop_fraction)``, then centre-cropped. Resizing is PIL's
(``preprocess_ops.resize``), as in the reference PyTorch pipeline. RandAugment, normalisation and
random erasing run on the device, in the train step (``batch_ops.train_images`` /
``batch_ops.eval_images``): a quarter of the bytes to transfer, and the per-pixel work where it
is cheapest.

The crop and flip of a training element come from stateless seeds of (seed, process, epoch,
position) (``sources.element_key``), so an element looks the same however the stream was
reached; RandAugment and random erasing on the device draw from the train step's key, a function
of (seed, step).
"""

from __future__ import annotations

import math

import tensorflow as tf

from crossformer_jax.data import preprocess_ops as ops
from crossformer_jax.data.config import data_field
from crossformer_jax.data.sources import AUGMENT_DOMAIN, element_key, shard_key


def _eval_resize_size(cfg) -> int:
    """The short side an eval image is resized to before the centre crop."""
    size = int(data_field(cfg, 'image_size'))
    fraction = float(data_field(cfg, 'eval_crop_fraction'))
    return math.floor(size / fraction + 1e-6)


def _augment_seeds(key: tf.Tensor, el) -> list[tf.Tensor]:
    """(crop, flip) seeds of a stream element: f(seed, process, epoch, position)."""
    return tf.unstack(tf.random.experimental.stateless_split(element_key(key, el), 2))


def train_decode(cfg, load_fn, *, seed: int, process_index: int):
    """Element -> {'image': uint8 pixels of its random resized crop window (before resizing)}.

    The training decode (the only step that can fail on a corrupt file)."""
    scale = tuple(data_field(cfg, 'rrc_scale'))
    ratio = tuple(data_field(cfg, 'rrc_ratio'))
    key = shard_key(seed, process_index, AUGMENT_DOMAIN)

    def fn(el):
        s_crop, _ = _augment_seeds(key, el)
        return {
            'image': ops.decode_random_crop(load_fn(el['data']), s_crop, scale=scale, ratio=ratio)
        }

    return fn


def train_preprocess(cfg, seed: int, process_index: int):
    """Cropped window -> {'image' uint8 (S, S, 3), 'label', 'id'}: resize, flip. RandAugment,
    normalisation and random erasing follow on the device (``batch_ops.train_images``)."""
    size = int(data_field(cfg, 'image_size'))
    hflip = bool(data_field(cfg, 'hflip'))
    key = shard_key(seed, process_index, AUGMENT_DOMAIN)

    def fn(el):
        _, s_flip = _augment_seeds(key, el)
        image = ops.resize(el['image'], [size, size], method='bicubic')
        if hflip:
            image = ops.random_flip_left_right(image, s_flip)
        return {
            'image': image,
            'label': tf.cast(el['label'], tf.int32),
            'id': el['id'],
        }

    return fn


def eval_preprocess(cfg):
    """Decoded image -> {'image' uint8 (S, S, 3), 'label', 'id'}; normalisation follows on the
    device."""
    size = int(data_field(cfg, 'image_size'))
    short = _eval_resize_size(cfg)
    if short < size:
        raise ValueError(f'eval_crop_fraction must be <= 1 (resize to {short} < crop {size})')

    def fn(el):
        image = ops.resize_short_side(el['image'], short)
        image = ops.center_crop(image, size)
        return {
            'image': image,
            'label': tf.cast(el['label'], tf.int32),
            'id': el['id'],
        }

    return fn
