"""Tests of the COCO detection data (crossformer_jax.data.coco) on a tiny COCO folder written to
tmp_path: annotation cleaning, resize geometry, grouped training batches (boxes against the
pixels, flips, exact resume, host slices, corrupt files), the multi-scale and crop training
geometry (its draws, windows, box clipping, canvases, resume) and the evaluation pass."""

import io
import json
import logging
import os
import sys

import ml_collections
import numpy as np
import pytest
from helpers import REPO
from PIL import Image

from crossformer_jax.data import coco, pipeline
from crossformer_jax.data.ade20k import resize_bilinear_uint8
from crossformer_jax.data.config import COCO_DEFAULTS

BACKGROUND = (40, 40, 40)
COLOURS = {2: (220, 30, 30), 5: (30, 220, 30), 9: (30, 30, 220)}  # by COCO category id
# Listed out of order: the contiguous ids follow the sorted COCO ids 2, 5, 9.
CATEGORIES = [{'id': 9, 'name': 'c'}, {'id': 2, 'name': 'b'}, {'id': 5, 'name': 'a'}]
SCALE = (96, 64)  # landscape canvas (64, 96), portrait (96, 64)
LANDSCAPE, PORTRAIT = (40, 60), (60, 40)  # (height, width): both resized by 1.6


def _bbox(x1, y1, x2, y2):
    return [x1, y1, x2 - x1, y2 - y1]


# image id -> (height, width), [(box x1, y1, x2, y2 painted and annotated, category id)]
TRAIN_IMAGES = {
    1: (LANDSCAPE, [((5, 4, 25, 20), 2), ((35, 22, 55, 36), 9)]),
    2: (LANDSCAPE, [((10, 10, 30, 30), 5)]),
    3: (LANDSCAPE, [((0, 0, 12, 15), 9)]),
    4: ((32, 60), [((20, 8, 44, 26), 2)]),  # resized to (51, 96)
    5: (LANDSCAPE, [((30, 5, 58, 35), 5)]),
    6: (LANDSCAPE, [((50, 30, 60, 40), 9)]),  # annotated partly outside: clipped to this
    7: (LANDSCAPE, [((8, 12, 20, 33), 2)]),
    8: (PORTRAIT, [((4, 6, 30, 28), 5)]),
    9: (PORTRAIT, [((10, 30, 36, 55), 9)]),
    10: (PORTRAIT, [((2, 2, 20, 40), 2)]),
    11: (LANDSCAPE, [((15, 15, 45, 35), 5)]),
    12: (LANDSCAPE, [((5, 5, 20, 20), 2)]),  # truncated file
    13: (LANDSCAPE, []),  # no annotation
    14: (LANDSCAPE, []),  # only a crowd box
    15: (PORTRAIT, []),  # only annotations that are dropped
}
# Annotations that are not painted: (image id, category id, bbox, iscrowd); the counts below.
TRAIN_EXTRA = [
    (1, 2, [70, 5, 10, 10], 0),  # outside
    (15, 5, [45, 5, 10, 10], 0),  # outside
    (2, 5, [5, 5, 0, 10], 0),  # zero width
    (3, 9, [5, 5, 0.5, 10], 0),  # w < 1
    (15, 2, [1, 1, 0.5, 0.5], 0),  # w, h < 1
    (4, 99, [1, 1, 5, 5], 0),  # unknown category
    (999, 2, [1, 1, 5, 5], 0),  # unknown image
    (5, 2, [1, 2, 3], 0),  # malformed bbox
    (14, 9, [5, 5, 20, 20], 1),  # crowd
    (7, 5, [30, 5, 20, 20], 1),  # crowd
]
DROPPED = {
    'outside': 2,
    'small': 3,
    'unknown_category': 1,
    'unknown_image': 1,
    'malformed': 1,
    'crowd': 2,
    'empty_images': 3,
}
CORRUPT_TRAIN = 12
LANDSCAPE_TRAIN = (1, 2, 3, 4, 5, 6, 7, 11, 12)  # 3 batches of 4 (3 slots wrap around)
PORTRAIT_TRAIN = (8, 9, 10)  # 1 batch of 4 (1 slot wraps around)

EVAL_IMAGES = {
    101: (LANDSCAPE, [((5, 4, 25, 20), 2), ((30, 10, 50, 30), 5)]),
    102: (LANDSCAPE, [((12, 12, 40, 30), 9)]),
    103: ((32, 60), [((20, 8, 44, 26), 5)]),
    104: (LANDSCAPE, [((5, 5, 20, 20), 2)]),  # empty file
    105: (LANDSCAPE, []),  # no annotation: kept for evaluation
    106: (PORTRAIT, [((4, 6, 30, 28), 9)]),
    107: (PORTRAIT, [((10, 30, 36, 55), 2)]),
    108: (PORTRAIT, [((2, 2, 20, 40), 5)]),
}
EVAL_EXTRA = [(102, 2, [41, 31, 10, 5], 1)]  # crowd: not a target in the batch
CORRUPT_EVAL = 104


def _png(image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format='PNG')
    return buffer.getvalue()


def _painted(size, boxes):
    image = np.full((*size, 3), BACKGROUND, np.uint8)
    for (x1, y1, x2, y2), category_id in boxes:
        image[y1:y2, x1:x2] = COLOURS[category_id]
    return image


def _write_split(root, split, images, extra, files=None):
    """DATA_DIR/<split>/<id>.png and the annotation file; files[id]: bytes written instead."""
    (root / split).mkdir(parents=True)
    (root / 'annotations').mkdir(exist_ok=True)
    entries, annotations = [], []
    for image_id, (size, boxes) in images.items():
        name = f'{image_id}.png'
        data = (files or {}).get(image_id)
        (root / split / name).write_bytes(_png(_painted(size, boxes)) if data is None else data)
        entries.append({'id': image_id, 'file_name': name, 'height': size[0], 'width': size[1]})
        for box, category_id in boxes:
            annotations.append((image_id, category_id, _bbox(*box), 0))
    annotations += extra
    if 6 in images:  # image 6's box is annotated past the image's right and bottom edges
        annotations = [(i, c, [50, 30, 20, 20] if i == 6 else b, z) for i, c, b, z in annotations]
    records = [
        {'id': k + 1, 'image_id': i, 'category_id': c, 'bbox': b, 'area': 100.0, 'iscrowd': z}
        for k, (i, c, b, z) in enumerate(annotations)
    ]
    (root / 'annotations' / f'instances_{split}.json').write_text(
        json.dumps({'images': entries, 'annotations': records, 'categories': CATEGORIES})
    )


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('coco')
    truncated = _png(_painted(LANDSCAPE, TRAIN_IMAGES[CORRUPT_TRAIN][1]))
    _write_split(
        root,
        'train2017',
        TRAIN_IMAGES,
        TRAIN_EXTRA,
        {CORRUPT_TRAIN: truncated[: len(truncated) // 2]},
    )
    _write_split(root, 'val2017', EVAL_IMAGES, EVAL_EXTRA, {CORRUPT_EVAL: b''})
    return root


def _cfg(root, **kw):
    cfg = dict(
        dataset='coco',
        data_dir=str(root),
        image_scale=SCALE,
        size_divisor=32,
        max_boxes=3,
        num_parallel_calls=2,
        prefetch=1,
    )
    cfg.update(kw)
    return ml_collections.ConfigDict(cfg)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _expected_boxes(images, category_ids, image_id):
    """(boxes in resized pixels unflipped, flipped, classes, resized width) of an image."""
    (h, w), boxes = images[image_id]
    new_h, new_w, _ = coco.resized_size(h, w, SCALE)
    plain = np.asarray([b for b, _ in boxes], np.float32).reshape(-1, 4)
    plain = plain * np.float32([new_w / w, new_h / h, new_w / w, new_h / h])
    flipped = np.stack([new_w - plain[:, 2], plain[:, 1], new_w - plain[:, 0], plain[:, 3]], 1)
    classes = np.asarray([category_ids.index(c) for _, c in boxes], np.int32)
    return plain, flipped, classes, (new_h, new_w)


def _check_boxes_against_pixels(image, size, boxes, classes, category_ids, margin=3):
    """Inside each box (shrunk by margin) the class colour; just outside it (grown by margin,
    where in the image) the background; outside the image size zeros."""
    h, w = size
    assert not image[h:].any() and not image[:, w:].any()
    for box, c in zip(boxes, classes):
        x1, y1, x2, y2 = np.round(box).astype(int)
        colour = COLOURS[category_ids[c]]
        assert (image[y1 + margin : y2 - margin, x1 + margin : x2 - margin] == colour).all()
        outside = []
        if y1 - margin >= 0:
            outside.append(image[y1 - margin, x1:x2])
        if y2 + margin < h:
            outside.append(image[y2 + margin, x1:x2])
        if x1 - margin >= 0:
            outside.append(image[y1:y2, x1 - margin])
        if x2 + margin < w:
            outside.append(image[y1:y2, x2 + margin])
        assert outside
        for line in outside:
            assert (line == BACKGROUND).all()


# ----------------------------------------------------------------------------
# Annotations and geometry


def test_load_annotations_cleans_and_logs_once(data_dir, caplog):
    coco.load_annotations.cache_clear()
    with caplog.at_level(logging.INFO, logger=coco.logger.name):
        split = coco.load_annotations(str(data_dir), 'train2017', training=True)
        again = coco.load_annotations(str(data_dir), 'train2017', training=True)
    assert again is split
    lines = [r.getMessage() for r in caplog.records if r.name == coco.logger.name]
    assert lines == [
        'instances_train2017.json: dropped 8 annotations (2 outside the image, 3 smaller than 1 '
        'pixel or of zero area, 1 of an unknown category, 1 of an unknown image, 1 with a '
        'malformed bbox); ignored 2 crowd boxes; skipped 3 of 15 images without annotations; '
        '12 images, 3 classes.'
    ]
    assert dict(split.dropped) == DROPPED
    assert split.category_ids == (2, 5, 9) and split.class_names == ('b', 'a', 'c')
    assert [im.image_id for im in split.images] == list(range(1, 13))
    first = split.images[0]
    assert first.path == str(data_dir / 'train2017' / '1.png')
    assert (first.height, first.width) == LANDSCAPE
    np.testing.assert_array_equal(first.boxes, [[5, 4, 25, 20], [35, 22, 55, 36]])
    np.testing.assert_array_equal(first.classes, [0, 2])
    assert first.boxes.dtype == np.float32 and first.classes.dtype == np.int32
    np.testing.assert_array_equal(split.images[5].boxes, [[50, 30, 60, 40]])  # clipped
    assert not any(im.crowd.any() for im in split.images)

    evaluation = coco.load_annotations(str(data_dir), 'val2017', training=False)
    assert [im.image_id for im in evaluation.images] == sorted(EVAL_IMAGES)  # every image
    crowd_image = evaluation.images[1]
    np.testing.assert_array_equal(crowd_image.crowd, [False, True])
    np.testing.assert_array_equal(crowd_image.boxes[1], [41, 31, 51, 36])


def test_bad_annotation_files_raise_naming_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r'instances_train2017\.json'):
        coco.load_annotations(str(tmp_path), 'train2017', training=True)
    (tmp_path / 'annotations').mkdir()
    path = tmp_path / 'annotations' / 'instances_train2017.json'
    path.write_text('{"images": []')
    with pytest.raises(ValueError, match=r'instances_train2017\.json: malformed JSON'):
        coco.load_annotations(str(tmp_path), 'train2017', training=True)
    path.write_text(json.dumps({'images': [], 'categories': CATEGORIES}))
    with pytest.raises(ValueError, match=r"expected a list under 'annotations', found nothing"):
        coco.load_annotations(str(tmp_path), 'train2017', training=False)
    path.write_text(json.dumps({'images': [], 'annotations': [], 'categories': CATEGORIES}))
    with pytest.raises(FileNotFoundError, match=r'image folder not found: .*train2017'):
        coco.load_annotations(str(tmp_path), 'train2017', training=False)
    (tmp_path / 'train2017').mkdir()
    entry = {'id': 1, 'file_name': 'a.png', 'height': 10}
    path.write_text(json.dumps({'images': [entry], 'annotations': [], 'categories': CATEGORIES}))
    with pytest.raises(ValueError, match=r"images\[0\] needs 'width' of type int, found None"):
        coco.load_annotations(str(tmp_path), 'train2017', training=False)


def test_resized_size_and_buckets():
    assert coco.resized_size(480, 640) == (800, 1067, pytest.approx(800 / 480))
    assert coco.resized_size(640, 480)[:2] == (1067, 800)
    assert coco.resized_size(427, 640)[:2] == (800, 1199)
    assert coco.resized_size(300, 1000)[:2] == (400, 1333)  # long side bound
    assert coco.resized_size(40, 60, SCALE) == (64, 96, 1.6)
    assert coco.resized_size(32, 60, SCALE) == (51, 96, 1.6)
    assert coco.bucket_shapes((1333, 800)) == ((800, 1344), (1344, 800))
    assert coco.bucket_shapes(SCALE) == ((64, 96), (96, 64))
    with pytest.raises(ValueError, match='image size must be positive'):
        coco.resized_size(0, 10)


def test_dataset_info_and_steps_per_epoch(data_dir):
    info = coco.dataset_info(_cfg(data_dir))
    assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (3, 12, 8)
    assert info.class_names == ('b', 'a', 'c')
    assert coco.steps_per_epoch(_cfg(data_dir), global_batch_size=4) == 4
    assert coco.steps_per_epoch(_cfg(data_dir), global_batch_size=2) == 5 + 2


# ----------------------------------------------------------------------------
# Training batches


def test_train_batches_boxes_pixels_and_orientation(data_dir, caplog):
    it = coco.create_train_iterator(_cfg(data_dir), global_batch_size=4, seed=0, return_ids=True)
    assert it.steps_per_epoch == 4
    category_ids = (2, 5, 9)
    with caplog.at_level(logging.WARNING, logger=coco.logger.name):
        batches = _take(it, 8)  # two epochs
    flips = []
    for k, batch in enumerate(batches):
        assert set(batch) == {'image', 'image_size', 'boxes', 'classes', 'box_mask', 'image_id'}
        landscape = batch['image'].shape == (4, 64, 96, 3)
        assert landscape or batch['image'].shape == (4, 96, 64, 3)
        assert batch['image'].dtype == np.uint8 and batch['image_size'].dtype == np.int32
        assert batch['boxes'].shape == (4, 3, 4) and batch['boxes'].dtype == np.float32
        assert batch['classes'].shape == (4, 3) and batch['classes'].dtype == np.int32
        assert batch['box_mask'].shape == (4, 3) and batch['box_mask'].dtype == bool
        group = LANDSCAPE_TRAIN if landscape else PORTRAIT_TRAIN
        global_batch = it.global_batch(k)
        assert global_batch.landscape == landscape
        planned = [it.split.images[i].image_id for i in global_batch.indices]
        for slot, image_id in enumerate(batch['image_id']):
            assert image_id in group and image_id != CORRUPT_TRAIN
            if planned[slot] == CORRUPT_TRAIN:
                continue  # a copy of another slot (checked below)
            assert image_id == planned[slot]
            plain, flipped, classes, size = _expected_boxes(TRAIN_IMAGES, category_ids, image_id)
            n = len(plain)
            assert tuple(batch['image_size'][slot]) == size
            np.testing.assert_array_equal(batch['box_mask'][slot], np.arange(3) < n)
            np.testing.assert_array_equal(batch['classes'][slot], [*classes, -1, -1, -1][:3])
            boxes = batch['boxes'][slot, :n]
            assert not batch['boxes'][slot, n:].any()
            flip = bool(global_batch.flips[slot])
            np.testing.assert_allclose(boxes, flipped if flip else plain, atol=1e-4)
            flips.append(flip)
            _check_boxes_against_pixels(batch['image'][slot], size, boxes, classes, category_ids)
    assert 0 < sum(flips) < len(flips)  # both flipped and unflipped images
    # Each epoch: every image in its group's batches, the wrapped slots repeating some
    for epoch in range(2):
        steps = range(4 * epoch, 4 * epoch + 4)
        ids = [it.split.images[i].image_id for k in steps for i in it.global_batch(k).indices]
        assert set(ids) == set(LANDSCAPE_TRAIN + PORTRAIT_TRAIN) and len(ids) == 16
        assert sum(batches[k]['image'].shape[1] == 64 for k in steps) == 3  # landscape batches
    # The corrupt image: counted at each of its occurrences, named once, its slot a copy
    occurrences = sum(
        it.split.images[i].image_id == CORRUPT_TRAIN
        for k in range(8)
        for i in it.global_batch(k).indices
    )
    assert occurrences >= 2
    assert it.corrupt_count == occurrences == pipeline.corrupt_image_count()
    assert it.corrupt_files == {str(data_dir / 'train2017' / '12.png')}
    warnings = [r.getMessage() for r in caplog.records if '12.png' in r.getMessage()]
    assert len(warnings) == 1 and 'Skipping corrupt or unreadable image' in warnings[0]
    for k, batch in enumerate(batches):
        ids = [it.split.images[i].image_id for i in it.global_batch(k).indices]
        for slot in np.flatnonzero(np.asarray(ids) == CORRUPT_TRAIN):
            copies = [
                s
                for s in range(4)
                if s != slot and batch['image'][s].tobytes() == batch['image'][slot].tobytes()
            ]
            assert copies and batch['image_id'][slot] == batch['image_id'][copies[0]]
    it.close()


def test_no_flip_when_disabled(data_dir):
    it = coco.create_train_iterator(
        _cfg(data_dir, hflip=False), global_batch_size=4, seed=0, return_ids=True
    )
    for batch in _take(it, 4):
        for slot, image_id in enumerate(batch['image_id']):
            plain, _, _, _ = _expected_boxes(TRAIN_IMAGES, (2, 5, 9), image_id)
            np.testing.assert_allclose(batch['boxes'][slot, : len(plain)], plain, atol=1e-4)
    it.close()


def test_resized_pixels_are_opencv_style_bilinear(data_dir):
    it = coco.create_train_iterator(
        _cfg(data_dir, hflip=False), global_batch_size=4, seed=0, return_ids=True
    )
    batch = next(it)
    slot = int(np.flatnonzero(batch['image_id'] != CORRUPT_TRAIN)[0])
    image_id = int(batch['image_id'][slot])
    size, boxes = TRAIN_IMAGES[image_id]
    h, w = batch['image_size'][slot]
    expected = resize_bilinear_uint8(_painted(size, boxes), int(h), int(w)).numpy()
    np.testing.assert_array_equal(batch['image'][slot, :h, :w], expected)
    it.close()


def test_exact_resume_and_seed(data_dir):
    cfg = _cfg(data_dir)
    fresh = coco.create_train_iterator(cfg, global_batch_size=4, seed=3, return_ids=True)
    fresh_batches = _take(fresh, 7)
    # step 5 lies in the second epoch (4 batches per epoch)
    resumed = coco.create_train_iterator(
        cfg, global_batch_size=4, seed=3, start_step=5, return_ids=True
    )
    for a, b in zip(fresh_batches[5:], _take(resumed, 2)):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), key
    other = coco.create_train_iterator(cfg, global_batch_size=4, seed=4, return_ids=True)
    orders = [[other.global_batch(k).indices.tolist() for k in range(4)]]
    orders.append([fresh.global_batch(k).indices.tolist() for k in range(4)])
    assert orders[0] != orders[1]
    without_ids = coco.create_train_iterator(cfg, global_batch_size=4, seed=3)
    assert 'image_id' not in next(without_ids)
    for iterator in (fresh, resumed, other, without_ids):
        iterator.close()


def test_hosts_take_slices_of_the_global_batch(data_dir):
    cfg = _cfg(data_dir)
    whole = coco.create_train_iterator(cfg, global_batch_size=4, seed=1, return_ids=True)
    hosts = [
        coco.create_train_iterator(
            cfg,
            global_batch_size=4,
            seed=1,
            start_step=2,
            process_index=p,
            process_count=2,
            return_ids=True,
        )
        for p in range(2)
    ]
    whole_batches = _take(whole, 5)[2:]
    for step, batch in enumerate(whole_batches, start=2):
        slices = [next(host) for host in hosts]
        planned = np.asarray(
            [whole.split.images[i].image_id for i in whole.global_batch(step).indices]
        )
        # A corrupt image's slot is filled from its own host's slice: compare the other slots.
        valid = planned != CORRUPT_TRAIN
        assert valid.sum() >= 2
        for key, value in batch.items():
            joined = np.concatenate([s[key] for s in slices])
            assert joined.dtype == value.dtype and joined.shape == value.shape
            np.testing.assert_array_equal(joined[valid], value[valid], err_msg=key)
        np.testing.assert_array_equal(batch['image_id'][valid], planned[valid])
    with pytest.raises(ValueError, match='global_batch_size 3 must be a positive multiple of'):
        coco.create_train_iterator(cfg, global_batch_size=3, seed=0, process_count=2)
    for iterator in (whole, *hosts):
        iterator.close()


def test_batch_where_nothing_decodes_raises(tmp_path):
    garbage = b'not an image' * 20
    wrong_size = _png(_painted((30, 60), [((1, 1, 9, 9), 2)]))  # annotated as 40x60
    images = {1: (LANDSCAPE, [((1, 1, 9, 9), 2)]), 2: (LANDSCAPE, [((1, 1, 9, 9), 5)])}
    _write_split(tmp_path, 'train2017', images, [], {1: garbage, 2: wrong_size})
    it = coco.create_train_iterator(_cfg(tmp_path), global_batch_size=2, seed=0)
    with pytest.raises(RuntimeError, match=r'no image of training batch 0 could be read'):
        next(it)
    assert it.corrupt_count == 2
    assert it.corrupt_files == {str(tmp_path / 'train2017' / n) for n in ('1.png', '2.png')}
    it.close()


def test_boxes_past_max_boxes_are_counted(data_dir, caplog):
    it = coco.create_eval_iterator(_cfg(data_dir, max_boxes=1), global_batch_size=4)
    with caplog.at_level(logging.WARNING, logger=coco.logger.name):
        first = next(it)
    assert first['boxes'].shape == (4, 1, 4) and it.truncated_images == 1  # image 101
    np.testing.assert_allclose(first['boxes'][0, 0], np.float32(1.6) * np.float32([5, 4, 25, 20]))
    assert sum('keep the first max_boxes=1' in r.getMessage() for r in caplog.records) == 1
    it.close()


# ----------------------------------------------------------------------------
# Multi-scale training with crops ('multiscale_crop')

MULTISCALE = dict(
    train_augment='multiscale_crop',
    multiscale_short_sides=(32, 48, 64),  # the test canvas' short side is 64
    crop_short_sides=(40, 50),
    crop_size_range=(20, 36),
)


def _recipe_draws(height, width, bounds, count=3000):
    recipe = coco.MultiScaleCrop.from_config(COCO_DEFAULTS)
    return [recipe.draw(height, width, np.random.default_rng(i), bounds) for i in range(count)]


def test_multiscale_crop_recipe_numbers(data_dir):
    recipe = coco.MultiScaleCrop.from_config(COCO_DEFAULTS)
    assert recipe == coco.MultiScaleCrop(
        1333, (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800), (400, 500, 600), (384, 600)
    )
    with pytest.raises(ValueError, match=r'multiscale_short_sides \(480, 832\) must not exceed'):
        coco.MultiScaleCrop.from_config({'multiscale_short_sides': (480, 832)})
    with pytest.raises(ValueError, match=r'crop_size_range must be \(min, max\), got \(600, 384'):
        coco.MultiScaleCrop.from_config({'crop_size_range': (600, 384)})
    with pytest.raises(ValueError, match=r'crop_short_sides must be a non-empty tuple of posit'):
        coco.MultiScaleCrop.from_config({'crop_short_sides': ()})
    with pytest.raises(ValueError, match=r"train_augment must be one of \('resize', 'multiscale"):
        coco.create_train_iterator(
            _cfg(data_dir, train_augment='crop'), global_batch_size=1, seed=0
        )


def test_multiscale_resize_policy_sizes():
    # A 480 x 640 image: short side s -> s x round(s * 4 / 3); all 11 scales, about half of
    # the images, never past the landscape canvas (800, 1333).
    draws = _recipe_draws(480, 640, (800, 1333))
    plain = [g for g in draws if g.crop is None]
    assert 0.45 < len(plain) / len(draws) < 0.55
    for g in plain:
        assert g.final == g.resized == (g.final[0], int(g.final[0] * 640 / 480 + 0.5))
    assert sorted({g.final[0] for g in plain}) == list(range(480, 801, 32))
    # The long side bound: 300 x 1000 at any short side from 480 on -> 400 x 1333.
    long_bound = _recipe_draws(300, 1000, (800, 1333), count=200)
    assert {g.final for g in long_bound if g.crop is None} == {(400, 1333)}


def test_multiscale_crop_policy_sizes_windows_and_canvas_bound():
    draws = [g for g in _recipe_draws(480, 640, (800, 1333), 6000) if g.crop is not None]
    # First resize to a short side of 400, 500 or 600.
    assert {g.resized for g in draws} == {(400, 533), (500, 667), (600, 800)}
    heights, widths, capped = set(), set(), 0
    for g in draws:
        top, left, ch, cw = g.crop
        h1, w1 = g.resized
        assert 384 <= ch <= min(h1, 600) and 384 <= cw <= min(w1, 600)
        assert 0 <= top <= h1 - ch and 0 <= left <= w1 - cw
        heights.add(ch)
        widths.add(cw)
        # The final resize: short side one of 480..800 (mmcv's rule), unless a portrait window
        # would be taller than the landscape canvas (800): then exactly 800 high.
        free = [
            (int(ch * f + 0.5), int(cw * f + 0.5))
            for f in (s / min(ch, cw) for s in range(480, 801, 32))
        ]
        if g.final in free:
            assert g.final[0] <= 800
        else:
            capped += 1
            assert ch > cw and g.final[0] == 800
            assert g.final == (800, int(cw * 800 / ch + 0.5))
        assert g.final[0] <= 800 and g.final[1] <= 1333
    assert min(heights) == min(widths) == 384 and max(heights) == max(widths) == 600
    assert 0 < capped < len(draws) / 4
    # Windows of a portrait image on the portrait canvas, the bound transposed.
    for g in _recipe_draws(640, 427, (1333, 800), count=500):
        assert g.final[0] <= 1333 and g.final[1] <= 800
        if g.crop is not None and g.crop[3] > g.crop[2]:  # a landscape window
            assert g.final[1] <= 800


def test_resized_size_bounds():
    assert coco.resized_size(600, 400, (1333, 800)) == (1200, 800, 2.0)
    assert coco.resized_size(600, 400, (1333, 800), bounds=(800, 1333))[:2] == (800, 533)
    assert coco.resized_size(400, 600, (1333, 800), bounds=(800, 1333)) == (800, 1200, 2.0)


def _painted_example(image_id, folder):
    """A CocoImage of TRAIN_IMAGES[image_id] (its file written to folder) and its pixels."""
    (h, w), boxes = TRAIN_IMAGES[image_id]
    pixels = _painted((h, w), boxes)
    path = folder / f'{image_id}.png'
    path.write_bytes(_png(pixels))
    image = coco.CocoImage(
        path=str(path),
        image_id=image_id,
        height=h,
        width=w,
        boxes=np.asarray([b for b, _ in boxes], np.float32),
        classes=np.arange(len(boxes), dtype=np.int32),
        crowd=np.zeros(len(boxes), bool),
    )
    return image, pixels


@pytest.mark.parametrize('flip', [False, True])
def test_crop_geometry_boxes_and_pixels(tmp_path, flip):
    image, pixels = _painted_example(1, tmp_path)  # 40 x 60: (5, 4, 25, 20), (35, 22, 55, 36)
    # 2x to 80 x 120, the window rows 10..60 and columns 30..90, then 64 x 77.
    geometry = coco.Geometry((80, 120), (10, 30, 50, 60), (64, 77))
    example = coco.load_example(image, SCALE, flip, geometry=geometry)
    resized = resize_bilinear_uint8(pixels, 80, 120).numpy()
    expected = resize_bilinear_uint8(resized[10:60, 30:90], 64, 77).numpy()
    np.testing.assert_array_equal(example['image'], expected[:, ::-1] if flip else expected)
    # Box 1 (10, 8, 50, 40) at 2x crosses the window's left and top edges: clipped to
    # (0, 0, 20, 30); box 2 (70, 44, 110, 72) its right and bottom ones: (40, 34, 60, 50).
    window = np.float32([[0, 0, 20, 30], [40, 34, 60, 50]])
    boxes = window * np.float32([77 / 60, 64 / 50, 77 / 60, 64 / 50])
    if flip:
        boxes = np.stack([77 - boxes[:, 2], boxes[:, 1], 77 - boxes[:, 0], boxes[:, 3]], 1)
    np.testing.assert_allclose(example['boxes'], boxes, atol=1e-4)
    np.testing.assert_array_equal(example['classes'], [0, 1])
    np.testing.assert_allclose(example['scale_factor'], [2 * 77 / 60, 2 * 64 / 50] * 2, 1e-6)

    # A window whose left edge is box 1's right edge (x = 50 at 2x): box 1 has no width
    # left and is dropped with its class; box 2 stays.
    geometry = coco.Geometry((80, 120), (0, 50, 80, 70), (80, 70))
    example = coco.load_example(image, SCALE, flip, geometry=geometry)
    np.testing.assert_array_equal(example['classes'], [1])
    expected_box = np.float32([20, 44, 60, 72])
    if flip:
        expected_box = np.float32([70 - 60, 44, 70 - 20, 72])
    np.testing.assert_allclose(example['boxes'], [expected_box], atol=1e-4)
    # A window with no box in it: the image is kept, without boxes.
    geometry = coco.Geometry((80, 120), (0, 112, 8, 8), (16, 16))
    empty = coco.load_example(image, SCALE, flip, geometry=geometry)
    assert empty['image'].shape == (16, 16, 3) and empty['boxes'].shape == (0, 4)
    assert empty['classes'].shape == (0,) and (empty['image'] == BACKGROUND).all()


def test_geometry_checks_its_window():
    for window in [(10, 0, 31, 60), (0, 10, 30, 51), (-1, 0, 5, 5), (0, 0, 0, 5)]:
        with pytest.raises(ValueError, match='the crop window must lie inside the resized'):
            coco.Geometry((40, 60), window, (40, 60))
    coco.Geometry((40, 60), (10, 20, 30, 40), (40, 60))  # touching the bottom right corner
    with pytest.raises(ValueError, match='without a crop the final size is the resized one'):
        coco.Geometry((40, 60), None, (20, 30))


def _expected_multiscale_boxes(image_id, geometry, flip):
    """(boxes in final pixels, kept classes) of a training image: scaled, shifted by the
    window, clipped, those without area dropped, scaled to the final size, flipped."""
    (h, w), boxes = TRAIN_IMAGES[image_id]
    boxes = np.asarray([b for b, _ in boxes], np.float64).reshape(-1, 4)
    classes = np.asarray([(2, 5, 9).index(c) for _, c in TRAIN_IMAGES[image_id][1]], np.int32)
    h1, w1 = geometry.resized
    boxes = boxes * [w1 / w, h1 / h, w1 / w, h1 / h]
    final_h, final_w = geometry.final
    if geometry.crop is not None:
        top, left, ch, cw = geometry.crop
        boxes = np.clip(boxes - [left, top, left, top], 0, [cw, ch, cw, ch])
        kept = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes = boxes[kept] * [final_w / cw, final_h / ch, final_w / cw, final_h / ch]
        classes = classes[kept]
    if flip:
        x1, y1, x2, y2 = boxes.T
        boxes = np.stack([final_w - x2, y1, final_w - x1, y2], 1)
    return boxes, classes


def test_multiscale_batches_follow_their_geometry_and_fit_the_canvas(data_dir):
    cfg = _cfg(data_dir, max_boxes=2, **MULTISCALE)
    it = coco.create_train_iterator(cfg, global_batch_size=4, seed=0, return_ids=True)
    crops = turned = sizes = 0
    for k, batch in enumerate(_take(it, 8)):
        planned = it.global_batch(k)
        canvas = (64, 96) if planned.landscape else (96, 64)
        assert batch['image'].shape == (4, *canvas, 3)
        for slot, index in enumerate(planned.indices):
            image_id = it.split.images[index].image_id
            if image_id == CORRUPT_TRAIN:
                continue
            geometry = planned.geometries[slot]
            h, w = geometry.final
            assert h <= canvas[0] and w <= canvas[1]
            assert tuple(batch['image_size'][slot]) == (h, w)
            assert not batch['image'][slot, h:].any() and not batch['image'][slot, :, w:].any()
            boxes, classes = _expected_multiscale_boxes(image_id, geometry, planned.flips[slot])
            n = min(len(boxes), 2)
            np.testing.assert_array_equal(batch['box_mask'][slot], np.arange(2) < n)
            np.testing.assert_array_equal(batch['classes'][slot, :n], classes[:n])
            np.testing.assert_allclose(batch['boxes'][slot, :n], boxes[:n], atol=1e-4)
            crops += geometry.crop is not None
            # a window of the other orientation than its canvas, fitted into it
            turned += (h > w) if planned.landscape else (w > h)
            sizes += 1
    assert 0 < crops < sizes and turned > 0
    it.close()


def test_multiscale_exact_resume_host_slices_and_seed(data_dir):
    cfg = _cfg(data_dir, **MULTISCALE)
    fresh = coco.create_train_iterator(cfg, global_batch_size=4, seed=3, return_ids=True)
    fresh_batches = _take(fresh, 7)
    resumed = coco.create_train_iterator(
        cfg, global_batch_size=4, seed=3, start_step=5, return_ids=True
    )
    for a, b in zip(fresh_batches[5:], _take(resumed, 2)):
        for key in a:
            assert a[key].tobytes() == b[key].tobytes(), key
    hosts = [
        coco.create_train_iterator(cfg, global_batch_size=4, seed=3, start_step=1,
                                   process_index=p, process_count=2, return_ids=True)
        for p in range(2)
    ]  # fmt: skip
    for step in (1, 2):
        slices = [next(host) for host in hosts]
        planned = [fresh.split.images[i].image_id for i in fresh.global_batch(step).indices]
        valid = np.asarray(planned) != CORRUPT_TRAIN  # filled from its own host's slice
        for key, value in fresh_batches[step].items():
            joined = np.concatenate([s[key] for s in slices])
            np.testing.assert_array_equal(joined[valid], value[valid], err_msg=key)
    other = coco.create_train_iterator(cfg, global_batch_size=4, seed=4)
    plain = coco.create_train_iterator(_cfg(data_dir), global_batch_size=4, seed=3)
    geometries = [fresh.global_batch(k).geometries for k in range(4)]
    assert geometries != [other.global_batch(k).geometries for k in range(4)]
    assert all(len(g) == 4 for g in geometries) and plain.global_batch(0).geometries is None
    for iterator in (fresh, resumed, other, plain, *hosts):
        iterator.close()


# ----------------------------------------------------------------------------
# Evaluation batches


def test_eval_batches_cover_every_image_once_across_hosts(data_dir, caplog):
    cfg = _cfg(data_dir)
    category_ids = (2, 5, 9)
    seen, lengths, shapes = [], [], []
    with caplog.at_level(logging.WARNING, logger=coco.logger.name):
        for p in range(2):
            it = coco.create_eval_iterator(
                cfg, global_batch_size=4, process_index=p, process_count=2
            )
            lengths.append(len(it))
            batches = list(it)
            assert len(batches) == len(it)
            shapes.append([b['image'].shape for b in batches])
            for batch in batches:
                assert set(batch) == {
                    'image',
                    'image_size',
                    'boxes',
                    'classes',
                    'box_mask',
                    'image_id',
                    'scale_factor',
                    'mask',
                }
                assert batch['image_id'].dtype == np.int64
                assert batch['scale_factor'].dtype == np.float32 and batch['mask'].dtype == bool
                for slot, image_id in enumerate(batch['image_id']):
                    if not batch['mask'][slot]:  # padding or the corrupt image: all zero
                        assert image_id in (-1, CORRUPT_EVAL)
                        assert not batch['image'][slot].any()
                        assert not batch['box_mask'][slot].any()
                        assert not batch['image_size'][slot].any()
                        continue
                    seen.append(int(image_id))
                    plain, _, classes, size = _expected_boxes(EVAL_IMAGES, category_ids, image_id)
                    assert tuple(batch['image_size'][slot]) == size
                    (h, w), (new_h, new_w) = EVAL_IMAGES[image_id][0], size
                    np.testing.assert_array_equal(
                        batch['scale_factor'][slot],
                        np.float32([new_w / w, new_h / h, new_w / w, new_h / h]),
                    )
                    n = len(plain)  # crowd boxes are not targets
                    np.testing.assert_array_equal(batch['box_mask'][slot], np.arange(3) < n)
                    np.testing.assert_allclose(batch['boxes'][slot, :n], plain, atol=1e-4)
                    _check_boxes_against_pixels(
                        batch['image'][slot], size, plain, classes, category_ids
                    )
            assert it.corrupt_count == (1 if p == 1 else 0)  # slot 3 of the first batch
            it.close()
    # 5 landscape images: 2 global batches (3 padding slots); 3 portrait: 1 batch
    assert lengths == [3, 3]
    assert shapes[0] == shapes[1] == [(2, 64, 96, 3), (2, 64, 96, 3), (2, 96, 64, 3)]
    assert sorted(seen) == sorted(set(EVAL_IMAGES) - {CORRUPT_EVAL})
    assert pipeline.corrupt_image_count() == 1
    assert any('104.png' in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------
# The demo dataset (scripts/make_detection_demo.py)


def test_detection_demo_dataset(tmp_path):
    from pycocotools import mask as mask_utils

    sys.path.insert(0, os.path.join(REPO, 'scripts'))
    try:
        import make_detection_demo as demo
    finally:
        sys.path.pop(0)
    counts = demo.write_detection_demo(str(tmp_path / 'a'), num_train=24, num_val=4, seed=1)
    demo.write_detection_demo(str(tmp_path / 'b'), num_train=24, num_val=4, seed=1)
    for name in ('annotations/instances_train2017.json', 'train2017/000000000024.jpg'):
        assert (tmp_path / 'a' / name).read_bytes() == (tmp_path / 'b' / name).read_bytes()

    train = coco.load_annotations(str(tmp_path / 'a'), 'train2017', training=True)
    assert train.category_ids == (1, 2, 3, 5, 7)
    assert train.class_names == ('square', 'disk', 'triangle', 'cross', 'star')
    assert set(train.dropped.values()) == {0}  # nothing to clean
    assert counts['train2017'] == (24, sum(len(im.boxes) for im in train.images))
    sizes = {(im.height, im.width) for im in train.images}
    assert sizes == {(128, 128), (128, 160), (160, 128)}
    with open(tmp_path / 'a' / 'annotations' / 'instances_train2017.json') as f:
        annotations = json.load(f)['annotations']
    for im in train.images:
        assert 1 <= len(im.boxes) <= 4
        sides = im.boxes[:, 2:] - im.boxes[:, :2]
        assert sides.min() >= 16 and sides.max() <= 64
        for i in range(len(im.boxes)):
            for j in range(i):  # boxes of one image never overlap
                a, b = im.boxes[i], im.boxes[j]
                assert a[0] >= b[2] or b[0] >= a[2] or a[1] >= b[3] or b[1] >= a[3]
    pixels = np.asarray(Image.open(tmp_path / 'a' / 'train2017' / '000000000001.jpg'))
    for ann in annotations:  # the polygon's mask: its box and area, painted in its colour
        image = next(im for im in train.images if im.image_id == ann['image_id'])
        rle = mask_utils.merge(
            mask_utils.frPyObjects(ann['segmentation'], image.height, image.width)
        )
        assert mask_utils.toBbox(rle).tolist() == ann['bbox']
        assert mask_utils.area(rle) == ann['area']
        if ann['image_id'] == 1:
            colour = next(c for i, _, c in demo.CATEGORIES if i == ann['category_id'])
            inside = pixels[mask_utils.decode(rle).astype(bool)].astype(float)
            assert np.abs(np.median(inside, axis=0) - colour).max() < 25
