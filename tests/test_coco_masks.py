"""Tests of COCO instance masks: segmentation decoding and cleaning, the box crops in training
batches (crossformer_jax.data.coco; also cut by the crop windows of multi-scale training), the
R-CNN mask targets (crossformer_jax.detection.mask_targets) and mask AP
(crossformer_jax.evaluators.coco)."""

import contextlib
import io
import json

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from crossformer_jax.data import coco
from crossformer_jax.detection.mask_targets import mask_targets
from crossformer_jax.detection.roi_align import roi_align
from crossformer_jax.evaluators import coco as coco_eval

CATEGORIES = [{'id': 1, 'name': 'a'}, {'id': 4, 'name': 'b'}]
SCALE = (96, 64)
SIZE = 8  # mask_size of the batches


def _rectangle_polygon(x1, y1, x2, y2):
    return [[x1, y1, x2, y1, x2, y2, x1, y2]]


def _uncompressed_rle(bitmap):
    """COCO's uncompressed RLE of a 0/1 bitmap: run lengths in column-major order, from 0s."""
    flat = bitmap.T.reshape(-1)
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {'size': list(bitmap.shape), 'counts': [int(c) for c in counts]}


def _disk(height, width, cx, cy, radius):
    y, x = np.mgrid[:height, :width] + 0.5
    return ((x - cx) ** 2 + (y - cy) ** 2 <= radius**2).astype(np.uint8)


# ----------------------------------------------------------------------------
# Decoding and cleaning


def test_decode_segmentation_polygons_and_rles():
    height, width = 20, 30
    # A polygon rectangle covers the pixels whose centres lie inside it (pycocotools' rule).
    rectangle = coco.decode_segmentation(_rectangle_polygon(5, 4, 15, 12), height, width)
    expected = np.zeros((height, width), np.uint8)
    expected[4:12, 5:15] = 1
    assert rectangle.dtype == np.uint8
    np.testing.assert_array_equal(rectangle, expected)
    # Two polygons merge.
    two = coco.decode_segmentation(
        _rectangle_polygon(5, 4, 15, 12) + _rectangle_polygon(20, 0, 25, 3)[0:1], height, width
    )
    expected[0:3, 20:25] = 1
    np.testing.assert_array_equal(two, expected)
    # A crowd's uncompressed RLE and a compressed RLE of a disk round-trip exactly.
    disk = _disk(height, width, 14.0, 9.0, 6.0)
    crowd = coco.decode_segmentation(_uncompressed_rle(disk), height, width)
    np.testing.assert_array_equal(crowd, disk)
    encoded = mask_util.encode(np.asfortranarray(disk))
    compressed = {'size': [height, width], 'counts': encoded['counts'].decode('ascii')}
    np.testing.assert_array_equal(coco.decode_segmentation(compressed, height, width), disk)
    assert disk.sum() == 112


@pytest.mark.parametrize(
    'segmentation, problem',
    [
        (None, 'a segmentation of type NoneType'),
        ([], 'no polygon'),
        ([[1, 2, 3, 4]], 'a polygon that is not a flat list of at least 3 x, y pairs'),
        ([[1, 2, 3, 4, 5]], 'a polygon that is not a flat list of at least 3 x, y pairs'),
        ([[1, 2, 3, 'x', 5, 6]], 'a polygon with a non-numeric or non-finite coordinate'),
        ({'size': [5, 4], 'counts': [20]}, 'RLE size [5, 4], expected [4, 5]'),
        ({'size': [4, 5], 'counts': [3, 4]}, 'RLE counts summing to 7, expected 20'),
        ({'size': [4, 5], 'counts': [3, -1, 18]}, 'RLE counts that are not non-negative'),
        ({'size': [4, 5], 'counts': 7}, 'RLE counts of type int'),
        ({'size': [4, 5], 'counts': ''}, 'empty RLE counts'),
    ],
)
def test_bad_segmentations_are_named(segmentation, problem):
    assert coco.segmentation_error(segmentation, 4, 5).startswith(problem)
    with pytest.raises(ValueError, match='bad segmentation: '):
        coco.decode_segmentation(segmentation, 4, 5)


# ----------------------------------------------------------------------------
# Training batches

# image id -> (height, width), [(box x1, y1, x2, y2, category id, segmentation kind)]; the
# object is the box's left half ('polygon'), a disk inside it ('rle', compressed) or the whole
# box ('crowd_rle', an uncompressed RLE).
IMAGES = {
    1: ((40, 60), [((4, 4, 24, 20), 1, 'polygon'), ((30, 10, 56, 36), 4, 'rle')]),
    2: ((40, 60), [((10, 8, 34, 32), 4, 'crowd_rle')]),
    3: ((40, 60), [((6, 6, 30, 30), 1, 'rle')]),
    4: ((40, 60), [((20, 2, 52, 22), 4, 'polygon')]),
    5: ((60, 40), [((2, 2, 30, 50), 1, 'polygon')]),
    6: ((40, 60), [((5, 5, 25, 25), 1, 'bad')]),  # only a bad segmentation: no training image
}
BAD = [  # (image id, box, segmentation): dropped with masks on, counted
    (1, (40, 2, 50, 8), [[1, 2]]),
    (3, (35, 5, 45, 15), {'size': [10, 10], 'counts': [100]}),
]


def _object(size, box, kind):
    """(bitmap of the object (h, w) uint8, its COCO segmentation)."""
    h, w = size
    x1, y1, x2, y2 = box
    bitmap = np.zeros((h, w), np.uint8)
    if kind == 'polygon':
        xm = (x1 + x2) // 2
        bitmap[y1:y2, x1:xm] = 1
        return bitmap, _rectangle_polygon(x1, y1, xm, y2)
    if kind == 'crowd_rle':
        bitmap[y1:y2, x1:x2] = 1
        return bitmap, _uncompressed_rle(bitmap)
    radius = min(x2 - x1, y2 - y1) / 2
    bitmap = _disk(h, w, (x1 + x2) / 2, (y1 + y2) / 2, radius)
    encoded = mask_util.encode(np.asfortranarray(bitmap))
    return bitmap, {'size': [h, w], 'counts': encoded['counts'].decode('ascii')}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('coco_masks')
    (root / 'train2017').mkdir()
    (root / 'annotations').mkdir()
    entries, annotations = [], []

    def add(image_id, box, category_id, segmentation):
        x1, y1, x2, y2 = box
        annotations.append(
            {
                'id': len(annotations) + 1,
                'image_id': image_id,
                'category_id': category_id,
                'bbox': [x1, y1, x2 - x1, y2 - y1],
                'area': float((x2 - x1) * (y2 - y1)),
                'iscrowd': 0,
                'segmentation': segmentation,
            }
        )

    for image_id, (size, objects) in IMAGES.items():
        pixels = np.full((*size, 3), 50, np.uint8)
        Image.fromarray(pixels).save(root / 'train2017' / f'{image_id}.png')
        entries.append({'id': image_id, 'file_name': f'{image_id}.png', 'height': size[0],
                        'width': size[1]})  # fmt: skip
        for box, category_id, kind in objects:
            segmentation = [[0, 0]] if kind == 'bad' else _object(size, box, kind)[1]
            add(image_id, box, category_id, segmentation)
    for image_id, box, segmentation in BAD:
        add(image_id, box, 1, segmentation)
    (root / 'annotations' / 'instances_train2017.json').write_text(
        json.dumps({'images': entries, 'annotations': annotations, 'categories': CATEGORIES})
    )
    return root


def _cfg(root, **kw):
    cfg = dict(
        dataset='coco',
        data_dir=str(root),
        image_scale=SCALE,
        max_boxes=3,
        num_parallel_calls=2,
        prefetch=1,
        masks=True,
        mask_size=SIZE,
    )
    cfg.update(kw)
    return ml_collections.ConfigDict(cfg)


def test_bad_segmentations_are_dropped_and_counted(data_dir, caplog):
    coco.load_annotations.cache_clear()
    with caplog.at_level('INFO', logger=coco.logger.name):
        split = coco.load_annotations(str(data_dir), 'train2017', training=True, masks=True)
    assert dict(split.dropped) == {
        'outside': 0,
        'small': 0,
        'unknown_category': 0,
        'unknown_image': 0,
        'malformed': 0,
        'segmentation': 3,
        'crowd': 0,
        'empty_images': 1,
    }
    assert '3 with a bad segmentation' in caplog.records[-1].getMessage()
    assert [im.image_id for im in split.images] == [1, 2, 3, 4, 5]
    assert [len(im.segmentations) for im in split.images] == [2, 1, 1, 1, 1]
    # Without masks the segmentations are not read (the bad ones stay).
    plain = coco.load_annotations(str(data_dir), 'train2017', training=True)
    assert 'segmentation' not in plain.dropped
    assert [len(im.boxes) for im in plain.images] == [3, 1, 2, 1, 1, 1]
    assert all(im.segmentations == () for im in plain.images)


def test_crop_mask_of_rectangle_and_disk():
    bitmap = np.zeros((50, 70), np.uint8)
    bitmap[10:30, 20:40] = 1  # a rectangle; the box twice its width and height around it
    crop = coco.crop_mask(bitmap, np.array([10, 0, 50, 40]), 8)
    expected = np.zeros((8, 8), np.uint8)
    expected[2:6, 2:6] = 1
    np.testing.assert_array_equal(crop, expected)
    # A disk cropped to its box: the crop is the disk of the bin centres.
    disk = _disk(200, 200, 100.0, 80.0, 40.0)
    crop = coco.crop_mask(disk, np.array([60, 40, 140, 120]), 16)
    centres = (np.arange(16) + 0.5) / 16 * 80 - 40
    inside = (centres[None, :] ** 2 + centres[:, None] ** 2 <= 40**2).astype(np.uint8)
    assert crop.dtype == np.uint8
    np.testing.assert_array_equal(crop, inside)
    assert crop.sum() == 208


def _expected_crop(image_id, k, flip):
    """The uint8 (SIZE, SIZE) crop of the k-th object of an image (from its bitmap)."""
    size, objects = IMAGES[image_id]
    box, _, kind = objects[k]
    crop = coco.crop_mask(_object(size, box, kind)[0], np.asarray(box, np.float32), SIZE)
    return crop[:, ::-1] if flip else crop


def test_train_batches_carry_box_crops_flipped_with_the_image(data_dir):
    coco.load_annotations.cache_clear()
    it = coco.create_train_iterator(_cfg(data_dir), global_batch_size=2, seed=0, return_ids=True)
    seen_flips = set()
    for step in range(6):
        batch = next(it)
        assert batch['masks'].shape == (2, 3, SIZE, SIZE) and batch['masks'].dtype == np.uint8
        flips = it.global_batch(step).flips
        for slot, image_id in enumerate(batch['image_id']):
            objects = IMAGES[int(image_id)][1]
            for k in range(3):
                if k < len(objects):
                    np.testing.assert_array_equal(
                        batch['masks'][slot, k], _expected_crop(int(image_id), k, flips[slot])
                    )
                    seen_flips.add((int(image_id), bool(flips[slot])))
                else:
                    assert not batch['masks'][slot, k].any()
    assert {f for _, f in seen_flips} == {False, True}
    # The crops are the objects' shapes: the left half of a polygon box, a flipped one's right
    # half, a disk's corners empty, a crowd RLE's whole box.
    half = _expected_crop(1, 0, False)
    assert half[:, : SIZE // 2].all() and not half[:, SIZE // 2 :].any()
    assert _expected_crop(1, 0, True)[:, SIZE // 2 :].all()
    disk = _expected_crop(3, 0, False)
    assert disk[SIZE // 2, :].all() and not disk[0, 0] and disk.sum() == 52
    assert _expected_crop(2, 0, False).all()


def test_masks_off_keeps_the_batch_keys(data_dir):
    it = coco.create_train_iterator(_cfg(data_dir, masks=False), global_batch_size=2, seed=0)
    assert sorted(next(it)) == ['box_mask', 'boxes', 'classes', 'image', 'image_size']


def test_resume_and_host_slices_with_masks(data_dir):
    cfg = _cfg(data_dir)
    fresh = coco.create_train_iterator(cfg, global_batch_size=4, seed=2, return_ids=True)
    batches = [next(fresh) for _ in range(4)]
    resumed = coco.create_train_iterator(
        cfg, global_batch_size=4, seed=2, start_step=2, return_ids=True
    )
    for expected in batches[2:]:
        got = next(resumed)
        assert sorted(got) == sorted(expected)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])
    assert batches[1]['masks'].any()
    hosts = [
        coco.create_train_iterator(
            cfg,
            global_batch_size=4,
            seed=2,
            start_step=1,
            process_index=p,
            process_count=2,
            return_ids=True,
        )
        for p in range(2)
    ]
    for expected in batches[1:]:
        parts = [next(h) for h in hosts]
        for key in expected:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), expected[key])


MULTISCALE = dict(
    train_augment='multiscale_crop',
    multiscale_short_sides=(32, 48, 64),
    crop_short_sides=(40, 50),
    crop_size_range=(20, 36),
)


@pytest.mark.parametrize('flip', [False, True])
def test_crop_cuts_masks_with_their_boxes(data_dir, flip):
    coco.load_annotations.cache_clear()
    split = coco.load_annotations(str(data_dir), 'train2017', training=True, masks=True)
    first, second = split.images[0], split.images[1]

    def mirrored(crop):
        return crop[:, ::-1] if flip else crop

    # Image 1 at its own size, the window columns 8..48, doubled: the polygon box (4, 4, 24,
    # 20), whose object is its left half (x < 14), is cut to (8, 4, 24, 20): the object fills
    # the first 6 of its 16 columns, 3 of the 8 mask columns. The disk's box (30, 10, 56, 36)
    # is cut to (30, 10, 48, 36): its mask is the disk's crop over that part.
    geometry = coco.Geometry((40, 60), (0, 8, 40, 40), (80, 80))
    example = coco.load_example(first, SCALE, flip, SIZE, geometry)
    boxes = np.float32([[0, 8, 32, 40], [44, 20, 80, 72]])
    if flip:
        boxes = np.stack([80 - boxes[:, 2], boxes[:, 1], 80 - boxes[:, 0], boxes[:, 3]], 1)
    np.testing.assert_allclose(example['boxes'], boxes, atol=1e-4)
    half = np.zeros((SIZE, SIZE), np.uint8)
    half[:, :3] = 1
    np.testing.assert_array_equal(example['masks'][0], mirrored(half))
    disk = _object((40, 60), (30, 10, 56, 36), 'rle')[0]
    cut_disk = coco.crop_mask(disk, np.float32([30, 10, 48, 36]), SIZE)
    assert (cut_disk != coco.crop_mask(disk, np.float32([30, 10, 56, 36]), SIZE)).any()
    np.testing.assert_array_equal(example['masks'][1], mirrored(cut_disk))

    # A rectangle object filling its box (10, 8, 34, 32) stays full when the window (rows
    # 16..40 at 2x, 8..20 of the image) cuts its box; a window missing it leaves neither box
    # nor mask.
    geometry = coco.Geometry((80, 120), (16, 0, 24, 120), (24, 120))
    example = coco.load_example(second, SCALE, flip, SIZE, geometry)
    box = [120 - 68, 0, 120 - 20, 24] if flip else [20, 0, 68, 24]
    np.testing.assert_allclose(example['boxes'], [box], atol=1e-4)
    assert example['masks'].shape == (1, SIZE, SIZE) and example['masks'].all()
    geometry = coco.Geometry((80, 120), (70, 0, 10, 120), (10, 120))
    empty = coco.load_example(second, SCALE, flip, SIZE, geometry)
    assert empty['masks'].shape == (0, SIZE, SIZE) and empty['boxes'].shape == (0, 4)


def test_multiscale_masks_follow_their_boxes(data_dir):
    """Each mask is the object's crop to its box mapped back to the original image."""
    coco.load_annotations.cache_clear()
    cfg = _cfg(data_dir, **MULTISCALE)
    it = coco.create_train_iterator(cfg, global_batch_size=2, seed=1, return_ids=True)
    crops = cut = 0
    for step in range(8):
        batch = next(it)
        planned = it.global_batch(step)
        for slot, image_id in enumerate(batch['image_id']):
            geometry, flip = planned.geometries[slot], planned.flips[slot]
            size, objects = IMAGES[int(image_id)]
            h1, w1 = geometry.resized
            final_h, final_w = geometry.final
            for k in np.flatnonzero(batch['box_mask'][slot]):
                x1, y1, x2, y2 = batch['boxes'][slot, k].astype(np.float64)
                if flip:
                    x1, x2 = final_w - x2, final_w - x1
                box = np.array([x1, y1, x2, y2])
                if geometry.crop is not None:
                    top, left, ch, cw = geometry.crop
                    box = box / np.tile([final_w / cw, final_h / ch], 2) + [left, top, left, top]
                box = box / np.tile([w1 / size[1], h1 / size[0]], 2)
                category_id = CATEGORIES[batch['classes'][slot, k]]['id']
                ((kind_box, _, kind),) = [o for o in objects if o[1] == category_id]
                expected = coco.crop_mask(_object(size, kind_box, kind)[0], box, SIZE)
                cut += np.abs(box - kind_box).max() > 1  # the window cut this box
                np.testing.assert_array_equal(
                    batch['masks'][slot, k], expected[:, ::-1] if flip else expected
                )
            crops += geometry.crop is not None
    assert crops > 0 and cut > 0
    it.close()


# ----------------------------------------------------------------------------
# Mask targets


def _numpy_targets(gt_masks, gt_boxes, rois, matched, size):
    """mask_targets point by point: each bin centre mapped into the gt crop, bilinear."""
    batch, count = matched.shape
    crop = gt_masks.shape[-1]
    out = np.zeros((batch, count, size, size), np.float32)
    for b in range(batch):
        for r in range(count):
            g = matched[b, r]
            x1, y1, x2, y2 = rois[b, r]
            gx1, gy1, gx2, gy2 = gt_boxes[b, g]
            m = gt_masks[b, g].astype(np.float64)
            for p in range(size):
                for q in range(size):
                    x = x1 + (q + 0.5) * (x2 - x1) / size
                    y = y1 + (p + 0.5) * (y2 - y1) / size
                    if not (gx1 <= x <= gx2 and gy1 <= y <= gy2):
                        continue
                    u = np.clip((x - gx1) / (gx2 - gx1) * crop - 0.5, 0, crop - 1)
                    v = np.clip((y - gy1) / (gy2 - gy1) * crop - 0.5, 0, crop - 1)
                    u0, v0 = int(np.floor(u)), int(np.floor(v))
                    u1, v1 = min(u0 + 1, crop - 1), min(v0 + 1, crop - 1)
                    fu, fv = u - u0, v - v0
                    value = (
                        m[v0, u0] * (1 - fv) * (1 - fu)
                        + m[v0, u1] * (1 - fv) * fu
                        + m[v1, u0] * fv * (1 - fu)
                        + m[v1, u1] * fv * fu
                    )
                    out[b, r, p, q] = value >= 0.5
    return out


def test_mask_targets_match_numpy():
    rng = np.random.default_rng(0)
    gt_masks = (rng.random((2, 3, 12, 12)) < 0.5).astype(np.uint8)
    gt_boxes = np.array(
        [[[10, 10, 50, 40], [0, 5, 30, 60], [20, 20, 21, 22]], [[5, 5, 25, 45], [0, 0, 1, 1],
         [30, 10, 70, 30]]], np.float32)  # fmt: skip
    rois = gt_boxes[:, [0, 1, 2, 0]] + rng.normal(0, 4, (2, 4, 4)).astype(np.float32)
    rois[..., 2:] = np.maximum(rois[..., 2:], rois[..., :2] + 2)
    matched = np.array([[0, 1, 2, 0], [0, 1, 2, 2]], np.int32)
    got = np.asarray(mask_targets(gt_masks, gt_boxes, rois, matched, size=7))
    expected = _numpy_targets(gt_masks, gt_boxes, rois, matched, 7)
    assert got.shape == (2, 4, 7, 7) and got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    assert 0 < expected.mean() < 1


def mask_iou_to_full_resolution(bitmap, gt_box, roi, crop_size=56, size=28):
    """IoU between mask_targets of a bitmap's crop and the RoIAlign (aligned, adaptive) of the
    full-resolution bitmap, >= 0.5 (MMDetection's target)."""
    crop = coco.crop_mask(bitmap, np.asarray(gt_box), crop_size)
    ours = mask_targets(
        jnp.asarray(crop)[None, None],
        jnp.asarray(gt_box, jnp.float32)[None, None],
        jnp.asarray(roi, jnp.float32)[None, None],
        jnp.zeros((1, 1), jnp.int32),
        size=size,
    )[0, 0]
    full = roi_align(
        jnp.asarray(bitmap, jnp.float32)[..., None],
        jnp.asarray(roi, jnp.float32)[None],
        output_size=size,
        spatial_scale=1.0,
        max_samples=64,
    )[0, ..., 0]
    ours, full = np.asarray(ours) > 0, np.asarray(full) >= 0.5
    return (ours & full).sum() / (ours | full).sum()


def _triangle(height, width, box):
    x1, y1, x2, y2 = box
    y, x = np.mgrid[:height, :width] + 0.5
    inside = (y >= y1) & (y <= y2) & (x >= x1) & (x - x1 <= (x2 - x1) * (y - y1) / (y2 - y1))
    return inside.astype(np.uint8)


def test_mask_targets_approximate_full_resolution_roi_align():
    rectangle = np.zeros((120, 160), np.uint8)
    rectangle[30:70, 50:110] = 1
    cases = [
        (rectangle, (50, 30, 110, 70), (45, 34, 104, 75), 0.9985),
        (_disk(200, 200, 100, 100, 50), (50, 50, 150, 150), (50, 50, 150, 150), 0.9615),
        (_disk(200, 200, 100, 100, 50), (50, 50, 150, 150), (60, 62, 145, 140), 1.0),
        (_disk(400, 400, 200, 200, 150), (50, 50, 350, 350), (5, 5, 395, 395), 1.0),
        (_triangle(150, 180, (30, 40, 150, 130)), (30, 40, 150, 130), (30, 40, 150, 130), 0.9676),
    ]
    # The numbers of mask_targets' module docstring.
    for bitmap, gt_box, roi, iou in cases:
        assert mask_iou_to_full_resolution(bitmap, gt_box, roi) == pytest.approx(iou, abs=1e-4)


# ----------------------------------------------------------------------------
# Mask AP


def _ground_truth(tmp_path):
    """Two images with a disk, a rectangle (polygon) and a crowd; the objects' bitmaps."""
    sizes = {1: (60, 80), 2: (50, 50)}
    disk = _disk(60, 80, 30, 25, 15)
    rect = np.zeros((50, 50), np.uint8)
    rect[10:40, 5:25] = 1
    bitmaps = {(1, 1): disk, (2, 4): rect}
    encoded = mask_util.encode(np.asfortranarray(disk))
    annotations = [
        {'id': 1, 'image_id': 1, 'category_id': 1, 'bbox': [15, 10, 30, 30], 'area': 709.0,
         'iscrowd': 0, 'segmentation': {'size': [60, 80],
                                        'counts': encoded['counts'].decode('ascii')}},
        {'id': 2, 'image_id': 2, 'category_id': 4, 'bbox': [5, 10, 20, 30], 'area': 600.0,
         'iscrowd': 0, 'segmentation': _rectangle_polygon(5, 10, 25, 40)},
    ]  # fmt: skip
    images = [{'id': i, 'file_name': f'{i}.png', 'height': h, 'width': w}
              for i, (h, w) in sizes.items()]  # fmt: skip
    path = tmp_path / 'instances_val.json'
    path.write_text(
        json.dumps({'images': images, 'annotations': annotations, 'categories': CATEGORIES})
    )
    return str(path), sizes, bitmaps


def _probabilities(bitmap, box, size=28):
    """A (size, size) 0/1 'probability' mask of the bitmap over box (its crop)."""
    return coco.crop_mask(bitmap, np.asarray(box), size).astype(np.float32)


def test_paste_mask_puts_the_crop_back():
    disk = _disk(60, 80, 30, 25, 15)
    box = np.array([15, 10, 45, 40], np.float64)
    pasted = coco_eval.paste_mask(_probabilities(disk, box), box, 60, 80)
    assert pasted.shape == (60, 80) and pasted.dtype == bool
    iou = (pasted & (disk > 0)).sum() / (pasted | (disk > 0)).sum()
    assert iou > 0.97
    assert not pasted[:8].any() and not pasted[:, 47:].any()
    # A uniform probability over a box fills the pixels whose centres are inside it.
    uniform = coco_eval.paste_mask(np.full((28, 28), 0.9), np.array([2, 3, 12, 9]), 20, 20)
    expected = np.zeros((20, 20), bool)
    expected[3:9, 2:12] = True
    np.testing.assert_array_equal(uniform, expected)


def test_masks_to_coco_and_segm_ap(tmp_path):
    path, sizes, bitmaps = _ground_truth(tmp_path)
    boxes = np.array([[[15, 10, 45, 40], [0, 0, 10, 10]], [[5, 10, 25, 40], [0, 0, 1, 1]]])
    probs = np.zeros((2, 2, 28, 28), np.float32)
    probs[0, 0] = _probabilities(bitmaps[(1, 1)], boxes[0, 0])
    probs[1, 0] = _probabilities(bitmaps[(2, 4)], boxes[1, 0])
    probs[0, 1] = 1.0
    args = dict(
        image_ids=np.array([1, 2]),
        boxes=boxes,
        mask_probs=probs,
        scores=np.array([[0.9, 0.3], [0.8, 0.0]]),
        classes=np.array([[0, 0], [1, 0]]),
        num_detections=np.array([1, 1]),
        category_ids=(1, 4),
        image_sizes=np.array([sizes[1], sizes[2]]),
    )
    results = coco_eval.masks_to_coco(**args)
    assert [(r['image_id'], r['category_id'], r['score']) for r in results] == [
        (1, 1, 0.9),
        (2, 4, 0.8),
    ]
    assert results[0]['segmentation']['size'] == [60, 80]
    assert isinstance(results[0]['segmentation']['counts'], str)
    json.dumps(results)  # JSON-ready
    metrics, summary = coco_eval.coco_metrics(path, results, iou_type='segm')
    assert metrics['AP'] == pytest.approx(1.0) and 'Average Precision' in summary

    # A false positive of higher score with a full-box mask, against pycocotools directly.
    args['num_detections'] = np.array([2, 1])
    args['scores'] = np.array([[0.9, 0.95], [0.8, 0.0]])
    results = coco_eval.masks_to_coco(**args)
    metrics, _ = coco_eval.coco_metrics(path, results, iou_type='segm')
    ground_truth = COCO(path)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(json.loads(json.dumps(results))),
                              iouType='segm')  # fmt: skip
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert [metrics[k] for k in coco_eval.METRIC_NAMES] == pytest.approx(evaluation.stats[:6])
    assert 0.4 < metrics['AP'] < 1.0
    # Box metrics still work through the old name.
    box_metrics, _ = coco_eval.coco_box_metrics(path, results)
    assert box_metrics['AP'] < 1.0


def test_segm_metrics_reject_entries_without_masks(tmp_path):
    path, _, _ = _ground_truth(tmp_path)
    entry = {'image_id': 1, 'category_id': 1, 'bbox': [0, 0, 5, 5], 'score': 0.5}
    with pytest.raises(ValueError, match="segm results need a 'segmentation'"):
        coco_eval.coco_metrics(path, [entry], iou_type='segm')
    with pytest.raises(ValueError, match="iou_type must be 'bbox' or 'segm'"):
        coco_eval.coco_metrics(path, [entry], iou_type='keypoints')
    with pytest.raises(ValueError, match=r'mask_probs: expected shape \(1, 1, m, m\)'):
        coco_eval.masks_to_coco(
            [1], np.zeros((1, 1, 4)), np.zeros((1, 28, 28)), np.ones((1, 1)),
            np.zeros((1, 1), int), [1], (1,), [[60, 80]],
        )  # fmt: skip
