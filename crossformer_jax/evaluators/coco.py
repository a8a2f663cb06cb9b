"""COCO box and mask AP of detections through pycocotools (COCOeval, iouType 'bbox' / 'segm').

    results = detections_to_coco(image_ids, boxes, scores, classes, num_detections,
                                 split.category_ids)
    metrics, summary = coco_box_metrics(split.annotation_file, results, image_ids=ids)
    segm = masks_to_coco(image_ids, boxes, mask_probs, scores, classes, num_detections,
                         split.category_ids, image_sizes)
    metrics, summary = coco_metrics(split.annotation_file, segm, iou_type='segm', image_ids=ids)

``metrics``: AP (IoU 0.50:0.95), AP50, AP75, APs, APm, APl, as COCOeval.stats[:6] (0..1; -1
where the ground truth of the evaluated images has no object of that size, as pycocotools
reports it). ``summary``: the table COCOeval.summarize() prints, for the log.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

METRIC_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')  # COCOeval.stats[:6]


def detections_to_coco(
    image_ids,
    boxes,
    scores,
    classes,
    num_detections,
    category_ids: Sequence[int],
) -> list[dict[str, Any]]:
    """COCO result entries of the first num_detections[i] detections of each image i.

    image_ids (N,) int; boxes (N, D, 4) x1, y1, x2, y2 in original pixels; scores (N, D);
    classes (N, D) contiguous class ids (category_ids[c] is the COCO id of class c);
    num_detections (N,) int. Returns [{'image_id', 'category_id', 'bbox': [x, y, w, h],
    'score'}] in image order, then detection order.
    """
    image_ids = np.asarray(image_ids)
    boxes = np.asarray(boxes, np.float64)
    scores = np.asarray(scores, np.float64)
    classes = np.asarray(classes)
    num_detections = np.asarray(num_detections)
    n = image_ids.shape[0] if image_ids.ndim == 1 else -1
    if n < 0 or boxes.ndim != 3 or boxes.shape[0] != n or boxes.shape[2] != 4:
        raise ValueError(
            f'expected image_ids (N,) and boxes (N, D, 4), got {image_ids.shape} and {boxes.shape}'
        )
    d = boxes.shape[1]
    for name, value, shape in (
        ('scores', scores, (n, d)),
        ('classes', classes, (n, d)),
        ('num_detections', num_detections, (n,)),
    ):
        if value.shape != shape:
            raise ValueError(f'{name}: expected shape {shape}, got {value.shape}')
    if np.any(num_detections < 0) or np.any(num_detections > d):
        raise ValueError(f'num_detections must lie in [0, {d}], got {num_detections.tolist()}')
    valid = np.arange(d)[None, :] < num_detections[:, None]
    used = classes[valid]
    if used.size and (used.min() < 0 or used.max() >= len(category_ids)):
        raise ValueError(
            f'class ids must lie in [0, {len(category_ids)}) (category_ids), got '
            f'{sorted(set(used.tolist()))}'
        )
    results = []
    for i, j in zip(*np.nonzero(valid)):
        x1, y1, x2, y2 = boxes[i, j].tolist()
        results.append(
            {
                'image_id': int(image_ids[i]),
                'category_id': int(category_ids[int(classes[i, j])]),
                'bbox': [x1, y1, x2 - x1, y2 - y1],
                'score': float(scores[i, j]),
            }
        )
    return results


def _paste_weights(start: float, end: float, first: int, last: int, size: int) -> np.ndarray:
    """(last - first, size) bilinear weights reading a mask of `size` pixels spanning [start,
    end] at the centres of image pixels first..last-1 (torch grid_sample, align_corners False,
    zeros outside the mask)."""
    extent = max(end - start, 1e-6)
    position = (np.arange(first, last) + 0.5 - start) / extent * size - 0.5
    lower = np.floor(position).astype(np.int64)
    upper_weight = position - lower
    weights = np.zeros((last - first, size + 2))  # columns 0 and size + 1: outside, dropped
    rows = np.arange(last - first)
    np.add.at(weights, (rows, np.clip(lower + 1, 0, size + 1)), 1 - upper_weight)
    np.add.at(weights, (rows, np.clip(lower + 2, 0, size + 1)), upper_weight)
    return weights[:, 1 : size + 1]


def paste_mask(
    mask_probs: np.ndarray, box: np.ndarray, height: int, width: int, threshold: float = 0.5
) -> np.ndarray:
    """A (m, m) mask of probabilities over box (x1, y1, x2, y2) pasted into a bool (height,
    width) image as MMDetection 2.x's paste: bilinear resampling of the probabilities at the
    pixel centres of the box's integer extent (floor(x1) - 1 .. ceil(x2) + 1, clipped to the
    image), 0 elsewhere, then >= threshold."""
    mask_probs = np.asarray(mask_probs, np.float64)
    x1, y1, x2, y2 = (float(v) for v in box)
    x_first, x_last = max(math.floor(x1) - 1, 0), min(math.ceil(x2) + 1, width)
    y_first, y_last = max(math.floor(y1) - 1, 0), min(math.ceil(y2) + 1, height)
    pasted = np.zeros((height, width), bool)
    if x_last <= x_first or y_last <= y_first:
        return pasted
    rows = _paste_weights(y1, y2, y_first, y_last, mask_probs.shape[0])
    cols = _paste_weights(x1, x2, x_first, x_last, mask_probs.shape[1])
    pasted[y_first:y_last, x_first:x_last] = rows @ mask_probs @ cols.T >= threshold
    return pasted


def masks_to_coco(
    image_ids,
    boxes,
    mask_probs,
    scores,
    classes,
    num_detections,
    category_ids: Sequence[int],
    image_sizes,
    threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """COCO segm result entries of the first num_detections[i] detections of each image i.

    As detections_to_coco (image_ids (N,), boxes (N, D, 4) x1, y1, x2, y2 in original pixels,
    scores, classes (N, D), num_detections (N,)), plus mask_probs (N, D, m, m) mask
    probabilities over each box (e.g. sigmoid of the mask head's logits of the detection's
    class) and image_sizes (N, 2) original (height, width). Each mask is pasted into its image
    (paste_mask) and RLE-encoded. Returns [{'image_id', 'category_id', 'bbox', 'score',
    'segmentation': {'size': [h, w], 'counts': str}}] in image order, then detection order.
    """
    entries = detections_to_coco(image_ids, boxes, scores, classes, num_detections, category_ids)
    image_ids = np.asarray(image_ids)
    boxes = np.asarray(boxes, np.float64)
    mask_probs = np.asarray(mask_probs, np.float32)
    image_sizes = np.asarray(image_sizes)
    n, d = boxes.shape[:2]
    if mask_probs.ndim != 4 or mask_probs.shape[:2] != (n, d):
        raise ValueError(
            f'mask_probs: expected shape ({n}, {d}, m, m), got {tuple(mask_probs.shape)}'
        )
    if image_sizes.shape != (n, 2) or np.any(image_sizes < 1):
        raise ValueError(
            f'image_sizes: expected ({n}, 2) positive (height, width), got '
            f'{image_sizes.tolist() if image_sizes.size <= 8 else image_sizes.shape}'
        )
    valid = np.arange(d)[None, :] < np.asarray(num_detections)[:, None]
    for entry, (i, j) in zip(entries, zip(*np.nonzero(valid))):
        height, width = (int(v) for v in image_sizes[i])
        pasted = paste_mask(mask_probs[i, j], boxes[i, j], height, width, threshold)
        rle = mask_util.encode(np.asfortranarray(pasted.astype(np.uint8)))
        entry['segmentation'] = {'size': [height, width], 'counts': rle['counts'].decode('ascii')}
    return entries


def load_coco(annotation_file: str) -> COCO:
    """A pycocotools COCO of an annotation file (read through tf.io.gfile, so gs:// works)."""
    if not tf.io.gfile.exists(annotation_file):
        raise FileNotFoundError(f'COCO annotation file not found: {annotation_file}')
    try:
        with tf.io.gfile.GFile(annotation_file, 'rb') as f:
            dataset = json.load(f)
    except ValueError as e:
        raise ValueError(f'{annotation_file}: malformed JSON ({e})') from e
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _detections(ground_truth: COCO, results: list[dict[str, Any]]) -> COCO:
    """The results as a pycocotools COCO (copies: loadRes edits its entries); an empty one for
    no results (loadRes cannot take them)."""
    if results:
        return ground_truth.loadRes(copy.deepcopy(results))
    detections = COCO()
    detections.dataset = {
        'images': list(ground_truth.dataset['images']),
        'categories': copy.deepcopy(ground_truth.dataset['categories']),
        'annotations': [],
    }
    detections.createIndex()
    return detections


def coco_box_metrics(
    annotations: str | COCO,
    results: list[dict[str, Any]],
    image_ids: Sequence[int] | None = None,
) -> tuple[dict[str, float], str]:
    """coco_metrics with iou_type 'bbox'."""
    return coco_metrics(annotations, results, iou_type='bbox', image_ids=image_ids)


def coco_metrics(
    annotations: str | COCO,
    results: list[dict[str, Any]],
    iou_type: str = 'bbox',
    image_ids: Sequence[int] | None = None,
) -> tuple[dict[str, float], str]:
    """(metrics, summary) of detections (see the module doc) over image_ids (default: every
    image of the annotations; an evaluated image without detections counts its objects missed).

    annotations: an annotation file or a pycocotools COCO (with 'segmentation's for 'segm');
    results: COCO result entries (detections_to_coco for 'bbox', masks_to_coco for 'segm');
    iou_type: 'bbox' (box IoU) or 'segm' (mask IoU). Quiet: pycocotools' prints are captured,
    the summary table returned.
    """
    if iou_type not in ('bbox', 'segm'):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    if iou_type == 'segm':
        missing = [i for i, r in enumerate(results) if 'segmentation' not in r]
        if missing:
            raise ValueError(
                f"segm results need a 'segmentation'; entries {missing[:10]} have none"
            )
    ground_truth = load_coco(annotations) if isinstance(annotations, str) else annotations
    known_images = set(ground_truth.getImgIds())
    if image_ids is None:
        image_ids = sorted(known_images)
    else:
        image_ids = sorted({int(i) for i in image_ids})
        unknown = sorted(set(image_ids) - known_images)
        if unknown:
            raise ValueError(f'image_ids not in the annotations: {unknown[:10]}')
    result_images = {r['image_id'] for r in results}
    unknown = sorted(result_images - set(image_ids))
    if unknown:
        raise ValueError(f'results name images that are not evaluated: {unknown[:10]}')
    unknown = sorted({r['category_id'] for r in results} - set(ground_truth.getCatIds()))
    if unknown:
        raise ValueError(f'results name categories not in the annotations: {unknown[:10]}')
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(ground_truth, _detections(ground_truth, results), iouType=iou_type)
        evaluation.params.imgIds = image_ids
        evaluation.evaluate()
        evaluation.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        evaluation.summarize()
    metrics = {name: float(v) for name, v in zip(METRIC_NAMES, evaluation.stats[:6])}
    return metrics, summary.getvalue()
