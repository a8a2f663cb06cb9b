"""The ``config.data`` fields the data code reads, with the defaults taken when a config leaves
one out, and ``data_field`` to read them. Light: no TensorFlow, so configs and on-device code
import it too."""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB, on the [0, 1] scale
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)  # the same on the 0..255 scale (dense tasks)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)

# Classification (crossformer_jax.data.pipeline, .classification, .sources) and the on-device
# batch ops (crossformer_jax.augment.batch_ops).
DATA_DEFAULTS: Mapping[str, Any] = types.MappingProxyType(
    {
        # TFDS name with 'image'/'label' features (prepared as TFRecord or ArrayRecord), or
        # 'image_folder' (DATA_DIR/<split>/<class>/<image>), or 'ade20k' (see .sources).
        'dataset': 'imagenet2012',
        'data_dir': '',  # TFDS data dir ('' = TFDS default) or the folder root
        'train_split': 'train',
        'eval_split': 'validation',
        'image_size': 224,
        # Eval: resize the short side to floor(image_size / fraction) (224 / 0.875 = 256), crop.
        'eval_crop_fraction': 0.875,
        'rrc_scale': (0.08, 1.0),  # random resized crop (bicubic)
        'rrc_ratio': (3 / 4, 4 / 3),
        'hflip': True,
        # On the device (batch_ops): RandAugment spec ('' disables); the fill of its geometric
        # ops (None: round(255 * mean), as timm's train transform); random erasing; normalisation.
        'randaugment': 'rand-m9-mstd0.5-inc1',
        'randaugment_fill': None,
        'random_erasing_prob': 0.25,
        'mean': IMAGENET_MEAN,
        'std': IMAGENET_STD,
        'shuffle_buffer': 16 * 1024,  # TFDS TFRecord only: records per shuffle group
        'num_parallel_calls': -1,  # <= 0: tf.data AUTOTUNE
        'prefetch': 2,  # batches prefetched by tf.data
        'private_threadpool_size': 0,  # > 0: tf.data runs on its own pool of that many threads
    }
)

# Semantic segmentation (crossformer_jax.data.ade20k); the other fields it reads default as in
# DATA_DEFAULTS, except image_size, scale, mean, std and num_classes, which it requires.
ADE20K_DEFAULTS: Mapping[str, Any] = types.MappingProxyType(
    {
        'train_split': 'training',
        'ratio_range': (0.5, 2.0),  # random rescale ratio range
        'cat_max_ratio': 0.75,  # redraw crops that one class dominates (>= 1: never)
        'photometric_distortion': True,
        'reduce_zero_label': True,  # PNG 0 -> ignored, v -> v - 1
    }
)

# Object detection (crossformer_jax.data.coco); the other fields it reads default as in
# DATA_DEFAULTS.
COCO_DEFAULTS: Mapping[str, Any] = types.MappingProxyType(
    {
        'dataset': 'coco',
        'train_split': 'train2017',
        'eval_split': 'val2017',
        'image_scale': (1333, 800),  # (long, short) side limits of the resized image
        'size_divisor': 32,  # canvas sides are multiples of this
        'max_boxes': 100,  # boxes per image in a batch (an image with more keeps its first ones)
        'hflip': True,  # training: horizontal flip with probability 0.5
        # The geometry of a training image (crossformer_jax/data/coco.py): 'resize' fits it into
        # image_scale (the 1x recipe); 'multiscale_crop' is the 3x recipe of Swin Transformer's
        # COCO configs (mask_rcnn_swin_*_mstrain_480-800_adamw_3x_coco.py), one of two policies
        # per image with equal probability (MMDetection's AutoAugment): resize to a short side
        # drawn from multiscale_short_sides; or resize to a short side drawn from
        # crop_short_sides, crop a random window with sides drawn in crop_size_range (each at
        # most the image's side), resize that to a short side drawn from multiscale_short_sides.
        # Every resize keeps the aspect ratio with the long side at most max(image_scale).
        'train_augment': 'resize',
        'multiscale_short_sides': tuple(range(480, 801, 32)),  # 480, 512, ..., 800
        'crop_short_sides': (400, 500, 600),
        'crop_size_range': (384, 600),  # (min, max) crop height and width, inclusive
        # Training batches also carry each box's instance mask cropped to it, mask_size^2.
        'masks': False,
        'mask_size': 56,
        'mean': IMAGENET_MEAN_255,
        'std': IMAGENET_STD_255,
    }
)

_MISSING = object()


def data_field(cfg: Any, name: str, defaults: Mapping[str, Any] = DATA_DEFAULTS) -> Any:
    """``cfg.<name>`` (a ConfigDict, dict or object), else ``defaults[name]``; KeyError naming
    ``config.data.<name>`` when neither has it."""
    if isinstance(cfg, Mapping) or hasattr(cfg, 'get'):
        value = cfg.get(name, _MISSING)
    else:
        value = getattr(cfg, name, _MISSING)
    if value is _MISSING:
        value = defaults.get(name, _MISSING)
    if value is _MISSING:
        raise KeyError(f'config.data.{name} is required')
    return value
