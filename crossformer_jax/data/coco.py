"""COCO object detection data: annotations, resize geometry and host-side batch iterators.

Layout (split names from ``config.data.train_split`` / ``eval_split``)::

    DATA_DIR/<split>/<file_name>                        # e.g. DATA_DIR/train2017/000000000009.jpg
    DATA_DIR/annotations/instances_<split>.json

Files are read through ``tf.io.gfile`` (gs:// works). The ``config.data`` fields read default as
in ``COCO_DEFAULTS`` (then ``DATA_DEFAULTS`` of crossformer_jax.data.config).

Public API (used by the detection task and trainer)::

    split = load_annotations(data_dir, 'train2017', training=True)      # CocoSplit
    info = dataset_info(config.data)                                     # sources.DatasetInfo
    train_it = create_train_iterator(config.data, global_batch_size=B, seed=0, start_step=k,
                                     process_index=p, process_count=n)
    eval_it = create_eval_iterator(config.data, global_batch_size=B, process_index=p,
                                   process_count=n)

Batches are dicts of numpy arrays (b = B / n images of this process, M = max_boxes):

* ``image`` uint8 (b, Hc, Wc, 3): the resized images top-left on a zero canvas of the batch's
  bucket (``bucket_shapes``: landscape or portrait, so two static shapes in all);
* ``image_size`` int32 (b, 2): each image's resized (height, width) before padding;
* ``boxes`` float32 (b, M, 4): x1, y1, x2, y2 in resized pixels (crowd boxes left out);
* ``classes`` int32 (b, M): contiguous class ids 0..K-1 (-1 in padding slots);
* ``box_mask`` bool (b, M): True for real boxes;
* with ``config.data.masks`` (training only): ``masks`` uint8 (b, M, S, S), S =
  ``mask_size``: each box's instance mask cropped to the box and resized to S x S (``crop_mask``;
  cut by the crop window like the box, flipped with the image), zeros in padding slots;
* evaluation also: ``image_id`` int64 (b,) (-1: padding), ``scale_factor`` float32 (b, 4)
  (``box_scale``: resized / original width and height for x1, y1, x2, y2; 1 for padding),
  ``mask`` bool (b,) (False: padding, or a corrupt image, which keeps its image_id); training
  batches carry ``image_id`` too with ``return_ids``.

Images are uint8 with zero padding; MMDetection pads after normalising (``mean`` / ``std`` on the
0..255 scale), so the task normalises on the device and sets the pixels outside ``image_size``
back to 0.

Design
------
*Geometry.* Each image is resized keeping its aspect ratio to fit ``image_scale`` (mmcv's rule,
``resized_size``), bilinearly with half-pixel centres and no antialiasing (OpenCV's
INTER_LINEAR) and rounded to uint8; boxes are scaled by each axis' ratio of the rounded sizes
(``box_scale``, as MMDetection does) and clipped to the resized image. Training flips
horizontally with probability 0.5 (x1' = w - x2, x2' = w - x1).

*Multi-scale training with crops* (``train_augment='multiscale_crop'``, ``MultiScaleCrop``; the
3x recipe, see ``COCO_DEFAULTS``). Each training image takes one of two policies with
probability 1/2: (a) resize (as above) to (L, s), s drawn from ``multiscale_short_sides``, L =
max(image_scale); (b) resize to (L, s1), s1 drawn from ``crop_short_sides``, then crop a window
of ch x cw pixels, ch drawn uniformly from the integers [min(h, lo), min(h, hi)] and cw from
[min(w, lo), min(w, hi)] ((lo, hi) = ``crop_size_range``, h x w the resized image), its top-left
corner uniform over the positions that keep it inside; then resize the window to (L, s2), s2
drawn from ``multiscale_short_sides``. MMDetection's RandomCrop with crop_type 'absolute_range'
and allow_negative_crop=True: boxes are shifted, clipped to the window, and those left without
area (x2 <= x1 or y2 <= y1) are dropped with their classes and masks; an image left without any
box still trains (all its box slots padding). The flip is applied last (MMDetection flips first;
the window's offset is uniform, so the two are the same distribution). A ``Geometry`` records
the sizes and the window of one image.

*Canvases of the multi-scale images.* Batches are planned before anything is decoded, so the
canvas of an image is its original orientation's, and a window of another orientation than its
image (600 pixels high and 400 wide, cut from a landscape image) must still fit it. The final
resize therefore also bounds the image by the canvas: height <= min(image_scale) and width <=
max(image_scale) on a landscape canvas (transposed on a portrait one; ``resized_size(...,
bounds=)``). An image or window of its canvas' orientation never meets the bound (its short
side is s <= min(image_scale)); a window of the other orientation keeps MMDetection's size
unless its long side would exceed the canvas' short side, and is then shrunk to it (that window
at s2 = 800 becomes 800 x 533, height x width, instead of 1200 x 800): about 8% of the cropped
images, 4% of all, on a simulated mix of COCO's usual image sizes.

*Instance masks.* With ``config.data.masks`` the training annotations keep each box's COCO
'segmentation' (polygons, uncompressed or compressed RLE), checked for its structure when the
annotations load (``segmentation_error``; a bad one drops its annotation, counted). Each image's
masks are decoded at its original size with pycocotools (``decode_segmentation``) on the host
while it loads, and only the S x S crops go into the batch, so no full-size bitmap reaches the
device.

*Order and resume.* MMDetection groups every batch by aspect ratio; here epoch ``e`` permutes the
landscape images and the portrait images with randomness of (seed, e), cuts each permutation into
global batches (the last one of each group filled by wrapping around that group's permutation)
and shuffles the list of global batches. Epochs follow each other endlessly. Global batch ``k``
is the same on every process; process ``p`` of ``n`` takes its slots ``[p B/n, (p+1) B/n)``. The
flip of each slot is drawn from (seed, epoch, batch, slot), and so are its multi-scale sizes and
window (a stream of its own per slot), so ``start_step=k`` resumes exactly at global batch ``k``
(bitwise) without decoding anything before it.

*Loading.* A thread pool (``num_parallel_calls`` threads, <= 0: one per CPU) reads, decodes and
resizes the images of the next ``prefetch`` batches ahead; batches are assembled in order.

*Corrupt images.* An image that cannot be read or decoded (truncated, empty, garbage, or of
another size than its annotation says) is counted and named in a warning once per file per
iterator. In a training batch its slot is filled with a copy of another image of the same local
batch (a batch where nothing decodes raises); in an evaluation batch the slot is masked out.

*Evaluation.* One pass over every image of the split: landscape images in file order cut into
global batches, then the portrait ones, the last batch of each group padded (``mask`` False).
Every process yields the same number of batches (``len()``) with the same shapes in the same
order, so multi-host evaluation stays in lockstep.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import io
import json
import logging
import math
import os
import types
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from PIL import Image
from pycocotools import mask as mask_util

from crossformer_jax.data import pipeline
from crossformer_jax.data.ade20k import resize_bilinear_uint8
from crossformer_jax.data.config import COCO_DEFAULTS, DATA_DEFAULTS, data_field
from crossformer_jax.data.sources import DatasetInfo

logger = logging.getLogger(__name__)

_DEFAULTS = types.MappingProxyType({**DATA_DEFAULTS, **COCO_DEFAULTS})

# Domains of the stateless random streams (numpy SeedSequence entropy (seed, domain, ...)).
ORDER_DOMAIN = 0  # per-epoch permutations of the groups and of the batches
FLIP_DOMAIN = 1  # per-batch horizontal flips of the slots
SCALE_CROP_DOMAIN = 2  # per-slot multi-scale sizes and crop windows

# config.data.train_augment: the geometry of the training images (see the module doc).
TRAIN_AUGMENTS = ('resize', 'multiscale_crop')


def coco_field(cfg, name: str) -> Any:
    """``config.data.<name>``, else its default in COCO_DEFAULTS, else in DATA_DEFAULTS."""
    return data_field(cfg, name, _DEFAULTS)


# ----------------------------------------------------------------------------
# Annotations


@dataclasses.dataclass(frozen=True, eq=False)
class CocoImage:
    """One image of a split and its boxes, in original pixels."""

    path: str
    image_id: int
    height: int
    width: int
    boxes: np.ndarray  # float32 (n, 4) x1, y1, x2, y2, clipped to the image
    classes: np.ndarray  # int32 (n,) contiguous class ids
    crowd: np.ndarray  # bool (n,) iscrowd flags (all False in a training split)
    # The COCO 'segmentation' of each box, as in the JSON (loaded with masks=True; else empty).
    segmentations: tuple[Any, ...] = ()

    @property
    def landscape(self) -> bool:
        """Whether the image goes to the landscape bucket (width >= height)."""
        return self.width >= self.height


@dataclasses.dataclass(frozen=True, eq=False)
class CocoSplit:
    """The images of a split (file order of the JSON) and its categories.

    ``category_ids[c]`` is the COCO id of contiguous class ``c`` (categories sorted by COCO id);
    ``dropped`` counts what the cleaning left out (see ``load_annotations``).
    """

    annotation_file: str
    images: tuple[CocoImage, ...]
    category_ids: tuple[int, ...]
    class_names: tuple[str, ...]
    dropped: Mapping[str, int]

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)


def annotation_path(data_dir: str, split: str) -> str:
    """DATA_DIR/annotations/instances_<split>.json."""
    return os.path.join(data_dir, 'annotations', f'instances_{split}.json')


def _read_json(path: str) -> dict:
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f'COCO annotation file not found: {path}')
    try:
        with tf.io.gfile.GFile(path, 'rb') as f:
            data = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f'{path}: malformed JSON ({e})') from e
    if not isinstance(data, dict):
        raise ValueError(f'{path}: expected a JSON object at the top, found {type(data).__name__}')
    for key in ('images', 'annotations', 'categories'):
        if not isinstance(data.get(key), list):
            found = 'nothing' if key not in data else type(data[key]).__name__
            raise ValueError(f'{path}: expected a list under {key!r}, found {found}')
    return data


def _entry_field(path: str, section: str, index: int, entry: Any, key: str, kind: type) -> Any:
    """entry[key] of the index-th entry of data[section], checked to be a `kind`."""
    value = entry.get(key) if isinstance(entry, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(
            f'{path}: {section}[{index}] needs {key!r} of type {kind.__name__}, found {value!r}'
        )
    return value


def _parse_bbox(bbox: Any) -> tuple[float, float, float, float] | None:
    """COCO [x, y, w, h] as four finite floats, None if malformed."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    try:
        values = tuple(float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    return values if all(math.isfinite(v) for v in values) else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def segmentation_error(segmentation: Any, height: int, width: int) -> str | None:
    """What is wrong with a COCO 'segmentation' of an image of height x width, None if it is
    well formed: a non-empty list of polygons (each a flat list of at least 3 x, y pairs of
    finite numbers), or an RLE {'size': [height, width], 'counts': list of non-negative ints
    (uncompressed) or str (compressed)}. Checks the structure only (cheap: no decoding)."""
    if isinstance(segmentation, list):
        if not segmentation:
            return 'no polygon'
        for polygon in segmentation:
            if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
                return 'a polygon that is not a flat list of at least 3 x, y pairs'
            if not all(_is_number(v) for v in polygon):
                return 'a polygon with a non-numeric or non-finite coordinate'
        return None
    if isinstance(segmentation, dict):
        size, counts = segmentation.get('size'), segmentation.get('counts')
        if size != [height, width]:
            return f'RLE size {size!r}, expected [{height}, {width}]'
        if isinstance(counts, str):
            return None if counts else 'empty RLE counts'
        if isinstance(counts, list):
            ints = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts)
            if not counts or not ints:
                return 'RLE counts that are not non-negative integers'
            if sum(counts) != height * width:
                return f'RLE counts summing to {sum(counts)}, expected {height * width}'
            return None
        return f'RLE counts of type {type(counts).__name__}'
    return f'a segmentation of type {type(segmentation).__name__}'


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO 'segmentation' (polygons, uncompressed or compressed RLE) as a uint8 (height,
    width) 0/1 mask (pycocotools; the polygons merged). ValueError naming the problem when it
    is malformed (segmentation_error) or cannot be decoded."""
    problem = segmentation_error(segmentation, height, width)
    if problem is not None:
        raise ValueError(f'bad segmentation: {problem}')
    try:
        if isinstance(segmentation, list):
            rle = mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation['counts'], list):
            rle = mask_util.frPyObjects(segmentation, height, width)
        else:
            rle = {'size': [height, width], 'counts': segmentation['counts'].encode('ascii')}
        mask = mask_util.decode(rle)
    except (TypeError, ValueError, UnicodeError) as e:
        raise ValueError(f'bad segmentation: cannot decode it ({e})') from e
    if mask.shape != (height, width):
        raise ValueError(f'bad segmentation: decoded to {mask.shape}, expected {(height, width)}')
    return mask.astype(np.uint8)


@functools.lru_cache(maxsize=8)
def load_annotations(
    data_dir: str, split: str, *, training: bool, masks: bool = False
) -> CocoSplit:
    """Reads and cleans DATA_DIR/annotations/instances_<split>.json (images in DATA_DIR/<split>).

    Boxes are clipped to their image; dropped (never an error) are annotations of an unknown
    image or category, with a malformed bbox, entirely outside the image, or smaller than 1 pixel
    (w < 1 or h < 1 after clipping) or of zero area. With masks, the non-crowd annotations keep
    their 'segmentation' (CocoImage.segmentations) and those with a missing or malformed one
    (segmentation_error) are dropped too, counted in dropped['segmentation']. Training also
    leaves out crowd boxes (not targets) and then the images without any box; evaluation keeps
    every image. The counts are logged in one line. Missing files and malformed JSON raise,
    naming the file. Cached.
    """
    path = annotation_path(data_dir, split)
    image_dir = os.path.join(data_dir, split)
    data = _read_json(path)
    if not tf.io.gfile.isdir(image_dir):
        raise FileNotFoundError(f'COCO image folder not found: {image_dir} (annotations: {path})')

    categories = {}
    for i, cat in enumerate(data['categories']):
        cat_id = _entry_field(path, 'categories', i, cat, 'id', int)
        if cat_id in categories:
            raise ValueError(f'{path}: category id {cat_id} appears twice')
        categories[cat_id] = str(_entry_field(path, 'categories', i, cat, 'name', str))
    if not categories:
        raise ValueError(f'{path}: no categories')
    category_ids = tuple(sorted(categories))
    class_of = {cat_id: c for c, cat_id in enumerate(category_ids)}

    entries = {}  # image id -> (file name, height, width)
    for i, image in enumerate(data['images']):
        image_id = _entry_field(path, 'images', i, image, 'id', int)
        if image_id in entries:
            raise ValueError(f'{path}: image id {image_id} appears twice')
        name = _entry_field(path, 'images', i, image, 'file_name', str)
        height = _entry_field(path, 'images', i, image, 'height', int)
        width = _entry_field(path, 'images', i, image, 'width', int)
        if height < 1 or width < 1:
            raise ValueError(f'{path}: images[{i}] ({name}) has size {height}x{width}')
        entries[image_id] = (name, height, width)

    dropped = dict.fromkeys(
        ('outside', 'small', 'unknown_category', 'unknown_image', 'malformed'), 0
    )
    if masks:
        dropped['segmentation'] = 0
    # image id -> [(box, class, crowd, segmentation)]
    targets = {image_id: [] for image_id in entries}
    for ann in data['annotations']:
        ann = ann if isinstance(ann, dict) else {}
        image_id, category_id = ann.get('image_id'), ann.get('category_id')
        if not isinstance(image_id, int) or image_id not in entries:
            dropped['unknown_image'] += 1
            continue
        if not isinstance(category_id, int) or category_id not in class_of:
            dropped['unknown_category'] += 1
            continue
        bbox = _parse_bbox(ann.get('bbox'))
        if bbox is None:
            dropped['malformed'] += 1
            continue
        _, height, width = entries[image_id]
        x, y, w, h = bbox
        x1, y1 = max(x, 0.0), max(y, 0.0)
        x2, y2 = min(x + w, float(width)), min(y + h, float(height))
        if w > 0 and h > 0 and (x2 <= x1 or y2 <= y1):
            dropped['outside'] += 1
            continue
        area = ann.get('area', w * h)
        if x2 - x1 < 1 or y2 - y1 < 1 or not isinstance(area, (int, float)) or area <= 0:
            dropped['small'] += 1
            continue
        crowd = bool(ann.get('iscrowd', 0))
        segmentation = ann.get('segmentation') if masks and not crowd else None
        if masks and not crowd and segmentation_error(segmentation, height, width) is not None:
            dropped['segmentation'] += 1
            continue
        targets[image_id].append(((x1, y1, x2, y2), class_of[category_id], crowd, segmentation))

    images, crowd_count, empty_count = [], 0, 0
    for image_id, (name, height, width) in entries.items():
        kept = targets[image_id]
        if training:
            crowd_count += sum(t[2] for t in kept)
            kept = [t for t in kept if not t[2]]
            if not kept:
                empty_count += 1
                continue
        images.append(
            CocoImage(
                path=os.path.join(image_dir, name),
                image_id=image_id,
                height=height,
                width=width,
                boxes=np.asarray([t[0] for t in kept], np.float32).reshape(-1, 4),
                classes=np.asarray([t[1] for t in kept], np.int32),
                crowd=np.asarray([t[2] for t in kept], bool),
                segmentations=tuple(t[3] for t in kept) if masks else (),
            )
        )

    name = os.path.basename(path)
    message = (
        f'{name}: dropped {sum(dropped.values())} annotations ({dropped["outside"]} outside the '
        f'image, {dropped["small"]} smaller than 1 pixel or of zero area, '
        f'{dropped["unknown_category"]} of an unknown category, {dropped["unknown_image"]} of an '
        f'unknown image, {dropped["malformed"]} with a malformed bbox'
        + (f', {dropped["segmentation"]} with a bad segmentation)' if masks else ')')
    )
    if training:
        dropped.update(crowd=crowd_count, empty_images=empty_count)
        message += (
            f'; ignored {crowd_count} crowd boxes; skipped {empty_count} of {len(entries)} images '
            'without annotations'
        )
    logger.info('%s; %d images, %d classes.', message, len(images), len(category_ids))
    return CocoSplit(
        annotation_file=path,
        images=tuple(images),
        category_ids=category_ids,
        class_names=tuple(categories[c] for c in category_ids),
        dropped=types.MappingProxyType(dropped),
    )


def dataset_info(data_config) -> DatasetInfo:
    """Classes (from the training annotations, else the evaluation ones) and images: training
    images with at least one box, every evaluation image (0 for a split without annotations)."""
    root = coco_field(data_config, 'data_dir')
    train_split = coco_field(data_config, 'train_split')
    eval_split = coco_field(data_config, 'eval_split')
    have_train = tf.io.gfile.exists(annotation_path(root, train_split))
    have_eval = tf.io.gfile.exists(annotation_path(root, eval_split))
    masks = bool(coco_field(data_config, 'masks'))
    train = load_annotations(root, train_split, training=True, masks=masks) if have_train else None
    evaluation = load_annotations(root, eval_split, training=False) if have_eval else None
    if train is None and evaluation is None:
        raise FileNotFoundError(
            'COCO annotation files not found: '
            f'{annotation_path(root, train_split)} nor {annotation_path(root, eval_split)}'
        )
    classes = train or evaluation
    return DatasetInfo(
        num_classes=classes.num_classes,
        num_train_examples=0 if train is None else len(train.images),
        num_eval_examples=0 if evaluation is None else len(evaluation.images),
        class_names=classes.class_names,
    )


# ----------------------------------------------------------------------------
# Geometry


def resized_size(
    height: int,
    width: int,
    scale: Sequence[int] = (1333, 800),
    bounds: Sequence[int] | None = None,
) -> tuple[int, int, float]:
    """(new height, new width, factor) of an image resized keeping its aspect ratio to fit
    scale (long and short side limits): factor = min(max(scale) / long side, min(scale) /
    short side), new side = int(side * factor + 0.5) (mmcv's rescale rule). With bounds
    (max height, max width) the factor is also at most max height / height and max width /
    width, so the result fits them too (a training canvas, see the module doc)."""
    if height < 1 or width < 1:
        raise ValueError(f'image size must be positive, got {height}x{width}')
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    if bounds is not None:
        factor = min(factor, bounds[0] / height, bounds[1] / width)
    return int(height * factor + 0.5), int(width * factor + 0.5), factor


def box_scale(height: int, width: int, new_h: int, new_w: int) -> np.ndarray:
    """float32 (4,) factors from original to resized box coordinates x1, y1, x2, y2: each axis
    by its own rounded ratio (new_w / width, new_h / height), as MMDetection scales boxes."""
    x, y = new_w / width, new_h / height
    return np.array([x, y, x, y], np.float32)


def bucket_shapes(
    scale: Sequence[int] = (1333, 800), size_divisor: int = 32
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The (height, width) canvases of the landscape (width >= height) and portrait images: the
    scale's short and long sides rounded up to multiples of size_divisor, e.g. (800, 1344) and
    (1344, 800) for (1333, 800)."""
    short = -(-min(scale) // size_divisor) * size_divisor
    long = -(-max(scale) // size_divisor) * size_divisor
    return (short, long), (long, short)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where the pixels of one training image go: resize the image to ``resized`` (height,
    width); with a ``crop`` (top, left, height, width) window of the resized image, cut it out
    and resize it to ``final`` (height, width); without one, ``final`` is ``resized``."""

    resized: tuple[int, int]
    crop: tuple[int, int, int, int] | None
    final: tuple[int, int]

    def __post_init__(self):
        if self.crop is None and self.final != self.resized:
            raise ValueError(f'{self}: without a crop the final size is the resized one')
        if self.crop is not None:
            top, left, height, width = self.crop
            outside = top + height > self.resized[0] or left + width > self.resized[1]
            if min(top, left) < 0 or min(height, width) < 1 or outside:
                raise ValueError(f'{self}: the crop window must lie inside the resized image')


def _sides(cfg, name: str, count: int | None = None) -> tuple[int, ...]:
    """config.data.<name> as a tuple of positive ints (count of them, if given)."""
    value = coco_field(cfg, name)
    sides = tuple(value) if isinstance(value, (list, tuple)) else ()
    if (
        not sides
        or (count is not None and len(sides) != count)
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sides)
    ):
        expected = f'{count} positive ints' if count else 'a non-empty tuple of positive ints'
        raise ValueError(f'config.data.{name} must be {expected}, got {value!r}')
    return sides


def _choice(rng: np.random.Generator, values: Sequence[int]) -> int:
    """One of values, uniformly."""
    return values[rng.integers(len(values))]


@dataclasses.dataclass(frozen=True)
class MultiScaleCrop:
    """The numbers of the 'multiscale_crop' training geometry (see the module doc): the long
    side limit of every resize, the short sides of the final resize, those of the resize before
    a crop and the (min, max) crop side."""

    long_side: int
    short_sides: tuple[int, ...]
    crop_short_sides: tuple[int, ...]
    crop_size_range: tuple[int, int]

    @classmethod
    def from_config(cls, cfg) -> MultiScaleCrop:
        """From config.data: long side max(image_scale); multiscale_short_sides (each at most
        min(image_scale), the canvas' short side), crop_short_sides, crop_size_range (min <=
        max). ValueError naming the field otherwise."""
        scale = tuple(int(s) for s in coco_field(cfg, 'image_scale'))
        short_sides = _sides(cfg, 'multiscale_short_sides')
        if max(short_sides) > min(scale):
            raise ValueError(
                f'config.data.multiscale_short_sides {short_sides} must not exceed the short '
                f'side of config.data.image_scale {scale} (the canvas)'
            )
        low, high = _sides(cfg, 'crop_size_range', 2)
        if low > high:
            raise ValueError(f'config.data.crop_size_range must be (min, max), got {(low, high)}')
        return cls(max(scale), short_sides, _sides(cfg, 'crop_short_sides'), (low, high))

    def draw(
        self, height: int, width: int, rng: np.random.Generator, bounds: Sequence[int]
    ) -> Geometry:
        """The geometry of an image of height x width: the policy, sizes and window drawn from
        rng; the final size also fits bounds (max height, max width): the canvas."""
        if rng.random() < 0.5:  # policy (a): one multi-scale resize
            scale = (self.long_side, _choice(rng, self.short_sides))
            new_h, new_w, _ = resized_size(height, width, scale, bounds)
            return Geometry((new_h, new_w), None, (new_h, new_w))
        # policy (b): resize, crop, resize
        scale = (self.long_side, _choice(rng, self.crop_short_sides))
        resized_h, resized_w, _ = resized_size(height, width, scale)
        low, high = self.crop_size_range
        crop_h = int(rng.integers(min(resized_h, low), min(resized_h, high) + 1))
        crop_w = int(rng.integers(min(resized_w, low), min(resized_w, high) + 1))
        top = int(rng.integers(resized_h - crop_h + 1))
        left = int(rng.integers(resized_w - crop_w + 1))
        scale = (self.long_side, _choice(rng, self.short_sides))
        new_h, new_w, _ = resized_size(crop_h, crop_w, scale, bounds)
        return Geometry((resized_h, resized_w), (top, left, crop_h, crop_w), (new_h, new_w))


# ----------------------------------------------------------------------------
# Loading one image


class CorruptImageError(Exception):
    """An image file that cannot be read or decoded, or whose size differs from its annotation."""


def decode_rgb(path: str) -> np.ndarray:
    """The image file's RGB pixels, uint8 (height, width, 3) (grayscale, CMYK, RGBA...
    converted); CorruptImageError when it cannot be read or decoded."""
    try:
        with tf.io.gfile.GFile(path, 'rb') as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as pil:
            return np.asarray(pil.convert('RGB'))
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise CorruptImageError(f'{type(e).__name__}: {e}') from e
    except tf.errors.OpError as e:
        raise CorruptImageError(f'{type(e).__name__}: {e.message}') from e


def read_image(image: CocoImage) -> np.ndarray:
    """The image's RGB pixels, uint8 (height, width, 3) (decode_rgb).

    Raises CorruptImageError when the file cannot be read or decoded, or when its size is not
    the annotation's.
    """
    pixels = decode_rgb(image.path)
    if pixels.shape[:2] != (image.height, image.width):
        raise CorruptImageError(
            f'decoded size {pixels.shape[0]}x{pixels.shape[1]} differs from the annotation '
            f'{image.height}x{image.width}'
        )
    return pixels


def _bilinear_taps(start: float, end: float, size: int, length: int):
    """Bilinear sampling of `size` bin centres spread over [start, end] (pixel coordinates,
    pixel i centred at i + 0.5) from `length` pixels: (lower index, upper index, upper weight),
    each (size,); indices clamped to the pixels (edge values repeat)."""
    centres = start + (np.arange(size) + 0.5) * (end - start) / size - 0.5
    centres = np.clip(centres, 0, length - 1)
    lower = np.floor(centres).astype(np.int64)
    upper = np.minimum(lower + 1, length - 1)
    return lower, upper, centres - lower


def crop_mask(mask: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """A 0/1 mask (H, W) cropped to box (x1, y1, x2, y2, its pixels) and resized to a uint8
    (size, size) 0/1 mask: bilinear samples of the 0/1 values at the centres of a size x size
    grid of bins over the box (half-pixel centres), then >= 0.5."""
    x1, y1, x2, y2 = (float(v) for v in box)
    y_lo, y_hi, y_w = _bilinear_taps(y1, y2, size, mask.shape[0])
    x_lo, x_hi, x_w = _bilinear_taps(x1, x2, size, mask.shape[1])
    values = mask.astype(np.float32)
    top = values[y_lo] * (1 - y_w[:, None]) + values[y_hi] * y_w[:, None]  # (size, W)
    sampled = top[:, x_lo] * (1 - x_w) + top[:, x_hi] * x_w
    return (sampled >= 0.5).astype(np.uint8)


def load_example(
    image: CocoImage,
    scale: Sequence[int],
    flip: bool,
    mask_size: int | None = None,
    geometry: Geometry | None = None,
) -> dict[str, np.ndarray]:
    """One image resized (cropped, resized again) and flipped with its non-crowd boxes: {'image'
    uint8 (h, w, 3), 'boxes' float32 (n, 4) in final pixels, 'classes' int32 (n,),
    'scale_factor' float32 (4,) (box_scale; the product of both resizes' with a crop)}; with a
    mask_size S (the image loaded with masks=True) also 'masks' uint8 (n, S, S): each box's
    decoded segmentation cropped to the box in original pixels (crop_mask; the crop maps onto the
    final box), flipped left-right with the image.

    geometry: the sizes and crop window (a Geometry, MultiScaleCrop.draw); None: resize to fit
    scale. A crop shifts the boxes, clips them to the window and drops those left without area
    (x2 <= x1 or y2 <= y1); a mask is then cropped to the part of its box inside the window.

    Raises CorruptImageError (see read_image), also when a segmentation cannot be decoded (the
    image is then skipped like a corrupt one).
    """
    pixels = read_image(image)
    if geometry is None:
        new_h, new_w, _ = resized_size(image.height, image.width, scale)
        geometry = Geometry((new_h, new_w), None, (new_h, new_w))
    resized_h, resized_w = geometry.resized
    resized = resize_bilinear_uint8(pixels, resized_h, resized_w).numpy()
    targets = np.flatnonzero(~image.crowd)  # the boxes that stay, as indices into image.boxes
    factors = box_scale(image.height, image.width, resized_h, resized_w)
    boxes = image.boxes[targets] * factors
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, resized_w)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, resized_h)
    mask_boxes = image.boxes[targets]  # what each mask is cropped to, in original pixels
    if geometry.crop is not None:
        top, left, crop_h, crop_w = geometry.crop
        offset = np.array([left, top, left, top], np.float32)
        boxes = boxes - offset
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, crop_w)
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, crop_h)
        kept = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, targets = boxes[kept], targets[kept]
        mask_boxes = (boxes + offset) / factors  # the part of each box inside the window
        final_h, final_w = geometry.final
        final_factors = box_scale(crop_h, crop_w, final_h, final_w)
        boxes = boxes * final_factors
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, final_w)
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, final_h)
        window = resized[top : top + crop_h, left : left + crop_w]
        resized = resize_bilinear_uint8(window, final_h, final_w).numpy()
        factors = factors * final_factors
    new_w = geometry.final[1]
    if flip:
        resized = resized[:, ::-1]
        boxes = np.stack([new_w - boxes[:, 2], boxes[:, 1], new_w - boxes[:, 0], boxes[:, 3]], 1)
    example = {
        'image': resized,
        'boxes': boxes.astype(np.float32),
        'classes': image.classes[targets],
        'scale_factor': factors,
    }
    if mask_size is not None:
        if len(image.segmentations) != len(image.boxes):
            raise ValueError(
                f'{image.path}: {len(image.segmentations)} segmentations for '
                f'{len(image.boxes)} boxes (load the annotations with masks=True)'
            )
        crops = np.zeros((len(targets), mask_size, mask_size), np.uint8)
        for k, index in enumerate(targets):
            try:
                bitmap = decode_segmentation(image.segmentations[index], image.height, image.width)
            except ValueError as e:
                raise CorruptImageError(f'box {index}: {e}') from e
            crops[k] = crop_mask(bitmap, mask_boxes[k], mask_size)
        example['masks'] = crops[:, :, ::-1] if flip else crops
    return example


# ----------------------------------------------------------------------------
# Iterators


@dataclasses.dataclass(frozen=True)
class GlobalBatch:
    """One global batch: image indices into the split (B,) (-1: padding), its canvas
    orientation, the flips of its slots (B,) bool and, with the 'multiscale_crop' training
    geometry, the Geometry of each slot (B of them; None: each image resized to fit
    image_scale)."""

    indices: np.ndarray
    landscape: bool
    flips: np.ndarray
    geometries: tuple[Geometry, ...] | None = None


def _rng(*entropy: int) -> np.random.Generator:
    """A numpy generator determined by non-negative integers (stateless randomness)."""
    return np.random.default_rng([int(e) % 2**63 for e in entropy])


def _orientation_groups(split: CocoSplit) -> tuple[np.ndarray, np.ndarray]:
    """Indices (file order) of the landscape images and of the portrait images."""
    landscape = np.asarray([im.landscape for im in split.images], bool)
    return np.flatnonzero(landscape), np.flatnonzero(~landscape)


class _BatchLoader:
    """Loads the local slices of global batches in a thread pool, a few batches ahead, and
    assembles them into batch dicts; counts and names the corrupt images."""

    def __init__(
        self, split: CocoSplit, cfg, global_batch_size: int, process_index: int, process_count: int
    ):
        if not 0 <= process_index < process_count:
            raise ValueError(f'bad process_index {process_index} for {process_count} processes')
        if global_batch_size < 1 or global_batch_size % process_count:
            raise ValueError(
                f'global_batch_size {global_batch_size} must be a positive multiple of the '
                f'{process_count} processes'
            )
        self.split = split
        self.local_batch_size = global_batch_size // process_count
        self._offset = process_index * self.local_batch_size
        self._scale = tuple(int(s) for s in coco_field(cfg, 'image_scale'))
        if len(self._scale) != 2 or min(self._scale) < 1:
            raise ValueError(f'config.data.image_scale must be two positive sides: {self._scale}')
        self._buckets = bucket_shapes(self._scale, int(coco_field(cfg, 'size_divisor')))
        self._max_boxes = int(coco_field(cfg, 'max_boxes'))
        self._mask_size = None  # S: the batches carry masks (b, M, S, S)
        threads = int(coco_field(cfg, 'num_parallel_calls'))
        self._executor = concurrent.futures.ThreadPoolExecutor(
            threads if threads > 0 else os.cpu_count() or 1, thread_name_prefix='coco-load'
        )
        self._depth = max(1, int(coco_field(cfg, 'prefetch'))) + 1  # batches loading at once
        self._queue: collections.deque = collections.deque()
        self.corrupt_count = 0
        self.corrupt_files: set[str] = set()
        self.truncated_images = 0  # images with more than max_boxes boxes

    def _load(
        self, index: int, flip: bool, geometry: Geometry | None
    ) -> dict[str, np.ndarray] | CorruptImageError:
        try:
            return load_example(
                self.split.images[index], self._scale, flip, self._mask_size, geometry
            )
        except CorruptImageError as e:
            return e

    def _submit(self, batch: GlobalBatch) -> None:
        local = slice(self._offset, self._offset + self.local_batch_size)
        geometries = batch.geometries or (None,) * len(batch.indices)
        futures = [
            None
            if index < 0
            else self._executor.submit(self._load, int(index), bool(flip), geometry)
            for index, flip, geometry in zip(
                batch.indices[local], batch.flips[local], geometries[local]
            )
        ]
        self._queue.append((batch, futures))

    def _next_loaded(self) -> tuple[GlobalBatch, list]:
        """The oldest submitted batch: its GlobalBatch and per slot an example, a
        CorruptImageError or None (padding)."""
        batch, futures = self._queue.popleft()
        return batch, [None if f is None else f.result() for f in futures]

    def _record_corrupt(self, index: int, error: CorruptImageError) -> None:
        path = self.split.images[index].path
        total = pipeline.add_corrupt_images(1)
        self.corrupt_count += 1
        if path not in self.corrupt_files:
            self.corrupt_files.add(path)
            logger.warning(
                'Skipping corrupt or unreadable image %r (%s; %d skipped so far in this process).',
                path,
                error,
                total,
            )

    def _assemble(self, batch: GlobalBatch, examples: list) -> tuple[dict, np.ndarray]:
        """Batch dict of the decoded examples (other slots zero) and a bool (b,) of them."""
        b, m = len(examples), self._max_boxes
        canvas = self._buckets[0] if batch.landscape else self._buckets[1]
        out = {
            'image': np.zeros((b, *canvas, 3), np.uint8),
            'image_size': np.zeros((b, 2), np.int32),
            'boxes': np.zeros((b, m, 4), np.float32),
            'classes': np.full((b, m), -1, np.int32),
            'box_mask': np.zeros((b, m), bool),
            'scale_factor': np.ones((b, 4), np.float32),
        }
        if self._mask_size is not None:
            s = self._mask_size
            out['masks'] = np.zeros((b, m, s, s), np.uint8)
        decoded = np.zeros((b,), bool)
        local = batch.indices[self._offset : self._offset + b]
        for slot, example in enumerate(examples):
            if isinstance(example, CorruptImageError):
                self._record_corrupt(int(local[slot]), example)
            if not isinstance(example, dict):
                continue
            h, w = example['image'].shape[:2]
            n = len(example['boxes'])
            if n > m:
                self.truncated_images += 1
                if self.truncated_images == 1:
                    logger.warning(
                        'Image %r has %d boxes; batches keep the first max_boxes=%d (raise '
                        'config.data.max_boxes to keep more). Counted in truncated_images.',
                        self.split.images[local[slot]].path,
                        n,
                        m,
                    )
                n = m
            out['image'][slot, :h, :w] = example['image']
            out['image_size'][slot] = (h, w)
            out['boxes'][slot, :n] = example['boxes'][:n]
            out['classes'][slot, :n] = example['classes'][:n]
            out['box_mask'][slot, :n] = True
            if self._mask_size is not None:
                out['masks'][slot, :n] = example['masks'][:n]
            out['scale_factor'][slot] = example['scale_factor']
            decoded[slot] = True
        out['image_id'] = np.asarray(
            [self.split.images[i].image_id if i >= 0 else -1 for i in local], np.int64
        )
        return out, decoded

    def close(self) -> None:
        """Stops loading ahead (the iterator cannot be used after)."""
        for _, futures in self._queue:
            for f in futures:
                if f is not None:
                    f.cancel()
        self._queue.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def __del__(self):
        executor = getattr(self, '_executor', None)
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)


class TrainIterator(_BatchLoader):
    """Endless local training batches (see the module doc); ``steps_per_epoch`` global
    batches per epoch; ``global_batch(k)`` describes global batch k."""

    def __init__(
        self,
        split: CocoSplit,
        cfg,
        *,
        global_batch_size: int,
        seed: int,
        start_step: int,
        process_index: int,
        process_count: int,
        return_ids: bool,
    ):
        super().__init__(split, cfg, global_batch_size, process_index, process_count)
        if not split.images:
            raise ValueError(f'{split.annotation_file}: no training image has a box')
        if start_step < 0:
            raise ValueError(f'start_step must be >= 0, got {start_step}')
        self.global_batch_size = global_batch_size
        self._seed = int(seed)
        self._hflip = bool(coco_field(cfg, 'hflip'))
        augment = coco_field(cfg, 'train_augment')
        if augment not in TRAIN_AUGMENTS:
            raise ValueError(
                f'config.data.train_augment must be one of {TRAIN_AUGMENTS}, got {augment!r}'
            )
        self._multiscale_crop = (
            MultiScaleCrop.from_config(cfg) if augment == 'multiscale_crop' else None
        )
        if coco_field(cfg, 'masks'):
            self._mask_size = int(coco_field(cfg, 'mask_size'))
            if self._mask_size < 1:
                raise ValueError(f'config.data.mask_size must be >= 1, got {self._mask_size}')
        self._groups = _orientation_groups(split)
        self.steps_per_epoch = sum(-(-len(g) // global_batch_size) for g in self._groups)
        self._return_ids = return_ids
        self._plan_epoch = -1
        self._plan: list[tuple[np.ndarray, bool]] = []
        self._next_step = int(start_step)
        self._submitted = int(start_step)

    def _epoch_plan(self, epoch: int) -> list[tuple[np.ndarray, bool]]:
        """The global batches of an epoch in order: (image indices (B,), landscape)."""
        if epoch != self._plan_epoch:
            rng = _rng(self._seed, ORDER_DOMAIN, epoch)
            b = self.global_batch_size
            batches = []
            for landscape, group in zip((True, False), self._groups):
                if len(group) == 0:
                    continue
                order = group[rng.permutation(len(group))]
                num = -(-len(order) // b)
                cut = order[np.arange(num * b) % len(order)].reshape(num, b)
                batches += [(indices, landscape) for indices in cut]
            self._plan = [batches[i] for i in rng.permutation(len(batches))]
            self._plan_epoch = epoch
        return self._plan

    def global_batch(self, step: int) -> GlobalBatch:
        """Global batch ``step`` of the endless stream (the same on every process)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        indices, landscape = self._epoch_plan(epoch)[position]
        if self._hflip:
            flips = _rng(self._seed, FLIP_DOMAIN, epoch, position).random(len(indices)) < 0.5
        else:
            flips = np.zeros(len(indices), bool)
        geometries = None
        if self._multiscale_crop is not None:
            # The final image fits the canvas' (height, width) limits, the image_scale sides.
            short, long = min(self._scale), max(self._scale)
            bounds = (short, long) if landscape else (long, short)
            geometries = tuple(
                self._multiscale_crop.draw(
                    self.split.images[index].height,
                    self.split.images[index].width,
                    _rng(self._seed, SCALE_CROP_DOMAIN, epoch, position, slot),
                    bounds,
                )
                for slot, index in enumerate(indices)
            )
        return GlobalBatch(indices, landscape, flips, geometries)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        while len(self._queue) < self._depth:
            self._submit(self.global_batch(self._submitted))
            self._submitted += 1
        batch, examples = self._next_loaded()
        step = self._next_step
        self._next_step += 1
        out, decoded = self._assemble(batch, examples)
        valid = np.flatnonzero(decoded)
        if valid.size == 0:
            local = batch.indices[self._offset : self._offset + len(examples)]
            files = [self.split.images[i].path for i in local]
            raise RuntimeError(
                f'no image of training batch {step} could be read and decoded on this process: '
                f'{files}'
            )
        missing = np.flatnonzero(~decoded)
        for k, slot in enumerate(missing):
            source = valid[k % valid.size]
            for value in out.values():
                value[slot] = value[source]
        del out['scale_factor']
        if not self._return_ids:
            del out['image_id']
        return out


class EvalIterator(_BatchLoader):
    """One pass of local evaluation batches (see the module doc); ``len()`` batches."""

    def __init__(
        self,
        split: CocoSplit,
        cfg,
        *,
        global_batch_size: int,
        process_index: int,
        process_count: int,
    ):
        super().__init__(split, cfg, global_batch_size, process_index, process_count)
        if not split.images:
            raise ValueError(f'{split.annotation_file}: no images')
        self._batches = []
        for landscape, group in zip((True, False), _orientation_groups(split)):
            num = -(-len(group) // global_batch_size)
            padded = np.full(num * global_batch_size, -1, np.int64)
            padded[: len(group)] = group
            for indices in padded.reshape(num, global_batch_size):
                flips = np.zeros(global_batch_size, bool)
                self._batches.append(GlobalBatch(indices, landscape, flips))
        self._submitted = 0
        self._emitted = 0

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._emitted >= len(self._batches):
            raise StopIteration
        while len(self._queue) < self._depth and self._submitted < len(self._batches):
            self._submit(self._batches[self._submitted])
            self._submitted += 1
        self._emitted += 1
        batch, examples = self._next_loaded()
        out, decoded = self._assemble(batch, examples)
        out['mask'] = decoded
        return out


def _split_for(data_config, split_field: str, training: bool) -> CocoSplit:
    """The split's annotations; a training split keeps its segmentations with config masks."""
    return load_annotations(
        str(coco_field(data_config, 'data_dir')),
        str(coco_field(data_config, split_field)),
        training=training,
        masks=training and bool(coco_field(data_config, 'masks')),
    )


def steps_per_epoch(data_config, *, global_batch_size: int) -> int:
    """Global training batches per epoch: ceil(landscape / B) + ceil(portrait / B)."""
    groups = _orientation_groups(_split_for(data_config, 'train_split', True))
    return sum(-(-len(g) // global_batch_size) for g in groups)


def create_train_iterator(
    data_config,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    return_ids: bool = False,
) -> TrainIterator:
    """Endless training batches of this process from global batch ``start_step`` on (exactly
    the batches a fresh iterator yields from its start_step-th on). ``return_ids``: batches also
    carry ``image_id`` int64 (b,)."""
    return TrainIterator(
        _split_for(data_config, 'train_split', True),
        data_config,
        global_batch_size=int(global_batch_size),
        seed=int(seed),
        start_step=int(start_step),
        process_index=int(process_index),
        process_count=int(process_count),
        return_ids=return_ids,
    )


def create_eval_iterator(
    data_config, *, global_batch_size: int, process_index: int = 0, process_count: int = 1
) -> EvalIterator:
    """One pass over every evaluation image, grouped by orientation (see the module doc)."""
    return EvalIterator(
        _split_for(data_config, 'eval_split', False),
        data_config,
        global_batch_size=int(global_batch_size),
        process_index=int(process_index),
        process_count=int(process_count),
    )
