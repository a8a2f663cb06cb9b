"""COCO box AP of detections through pycocotools (COCOeval, iouType 'bbox').

    results = detections_to_coco(image_ids, boxes, scores, classes, num_detections,
                                 split.category_ids)
    metrics, summary = coco_box_metrics(split.annotation_file, results, image_ids=ids)

``metrics``: AP (IoU 0.50:0.95), AP50, AP75, APs, APm, APl, as COCOeval.stats[:6] (0..1; -1
where the ground truth of the evaluated images has no object of that size, as pycocotools
reports it). ``summary``: the table COCOeval.summarize() prints, for the log.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf
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
    """(metrics, summary) of box detections (see the module doc) over image_ids (default: every
    image of the annotations; an evaluated image without detections counts its objects missed).

    annotations: an annotation file or a pycocotools COCO; results: COCO result entries (e.g.
    detections_to_coco). Quiet: pycocotools' prints are captured, the summary table returned.
    """
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
        evaluation = COCOeval(ground_truth, _detections(ground_truth, results), iouType='bbox')
        evaluation.params.imgIds = image_ids
        evaluation.evaluate()
        evaluation.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        evaluation.summarize()
    metrics = {name: float(v) for name, v in zip(METRIC_NAMES, evaluation.stats[:6])}
    return metrics, summary.getvalue()
