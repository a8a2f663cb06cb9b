"""Tests of crossformer_jax.evaluators.coco: COCO result entries and box AP against hand-made
ground truth, numbers reasoned out by hand and pycocotools called directly."""

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from crossformer_jax.evaluators import coco as coco_eval

CATEGORIES = [{'id': 1, 'name': 'cat'}, {'id': 3, 'name': 'dog'}]
# image id -> [(category id, [x, y, w, h])]: objects of every COCO size (small < 32^2 <= medium
# < 96^2 <= large area)
OBJECTS = {
    1: [(1, [10, 10, 100, 100]), (3, [120, 120, 40, 40])],
    2: [(3, [20, 30, 20, 20]), (1, [50, 50, 60, 60])],
    3: [(1, [5, 5, 30, 50])],
}


def _write_ground_truth(path, objects, sizes=None):
    """A COCO annotation file of 200x200 images (or sizes[id]) holding `objects`."""
    images, annotations = [], []
    for image_id, boxes in objects.items():
        h, w = (sizes or {}).get(image_id, (200, 200))
        images.append({'id': image_id, 'file_name': f'{image_id}.jpg', 'height': h, 'width': w})
        for category_id, bbox in boxes:
            annotations.append(
                {
                    'id': len(annotations) + 1,
                    'image_id': image_id,
                    'category_id': category_id,
                    'bbox': bbox,
                    'area': bbox[2] * bbox[3],
                    'iscrowd': 0,
                }
            )
    path.write_text(
        json.dumps({'images': images, 'annotations': annotations, 'categories': CATEGORIES})
    )
    return str(path)


def _result(image_id, category_id, bbox, score):
    return {'image_id': image_id, 'category_id': category_id, 'bbox': bbox, 'score': score}


@pytest.fixture
def ground_truth(tmp_path):
    return _write_ground_truth(tmp_path / 'instances_val.json', OBJECTS)


def test_detections_to_coco_converts_boxes_classes_and_counts():
    boxes = np.array(
        [
            [[10, 20, 40, 60], [0, 0, 5, 5], [1, 1, 2, 2]],
            [[100.5, 50.25, 110.5, 70.25], [7, 8, 9, 10], [0, 0, 0, 0]],
        ],
        np.float32,
    )
    scores = np.array([[0.9, 0.5, 0.1], [0.75, 0.3, 0.2]], np.float32)
    classes = np.array([[1, 0, 1], [0, 1, 7]], np.int32)  # class 7 is past num_detections
    results = coco_eval.detections_to_coco(
        np.array([42, 7]), boxes, scores, classes, np.array([2, 1]), (1, 3)
    )
    assert results == [
        _result(42, 3, [10.0, 20.0, 30.0, 40.0], pytest.approx(0.9)),
        _result(42, 1, [0.0, 0.0, 5.0, 5.0], 0.5),
        _result(7, 1, [100.5, 50.25, 10.0, 20.0], 0.75),
    ]
    assert all(type(v) in (int, float) for r in results for v in (r['image_id'], r['score']))


def test_detections_to_coco_rejects_bad_input():
    boxes, scores, classes = np.zeros((2, 3, 4)), np.zeros((2, 3)), np.zeros((2, 3), np.int32)
    with pytest.raises(ValueError, match=r'scores: expected shape \(2, 3\)'):
        coco_eval.detections_to_coco([1, 2], boxes, scores[:, :2], classes, [1, 1], (1,))
    with pytest.raises(ValueError, match=r'boxes \(N, D, 4\)'):
        coco_eval.detections_to_coco([1, 2], boxes[..., :3], scores, classes, [1, 1], (1,))
    with pytest.raises(ValueError, match=r'num_detections must lie in \[0, 3\]'):
        coco_eval.detections_to_coco([1, 2], boxes, scores, classes, [4, 1], (1,))
    with pytest.raises(ValueError, match=r'class ids must lie in \[0, 1\)'):
        coco_eval.detections_to_coco([1, 2], boxes, scores, classes + 1, [1, 1], (1,))


def test_perfect_detections_give_ap_one(ground_truth, capsys):
    results = [
        _result(image_id, category_id, bbox, 0.9)
        for image_id, boxes in OBJECTS.items()
        for category_id, bbox in boxes
    ]
    metrics, summary = coco_eval.coco_box_metrics(ground_truth, results)
    assert metrics == pytest.approx(dict.fromkeys(coco_eval.METRIC_NAMES, 1.0), abs=1e-12)
    assert 'Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000' in (
        summary
    )
    assert capsys.readouterr().out == ''  # quiet: pycocotools' prints are captured


def test_partial_overlap_counts_only_below_its_iou(tmp_path):
    # One 100x100 object (large), detected by a 100x62 box: IoU 0.62 matches at the thresholds
    # 0.50, 0.55 and 0.60 of the ten, so AP = 3 / 10, AP50 = 1, AP75 = 0; no small or medium
    # objects: -1 (undefined).
    path = _write_ground_truth(tmp_path / 'gt.json', {5: [(1, [10, 10, 100, 100])]})
    metrics, _ = coco_eval.coco_box_metrics(path, [_result(5, 1, [10, 10, 100, 62], 0.8)])
    expected = {'AP': 0.3, 'AP50': 1.0, 'AP75': 0.0, 'APs': -1.0, 'APm': -1.0, 'APl': 0.3}
    assert metrics == pytest.approx(expected, abs=1e-12)


def test_false_positive_ranked_first_halves_precision(tmp_path):
    # The false positive comes first: the true positive reaches recall 1 at precision 1/2, the
    # interpolated precision at every recall level, so AP = 0.5 at every IoU threshold.
    path = _write_ground_truth(tmp_path / 'gt.json', {5: [(3, [50, 50, 40, 40])]})
    results = [_result(5, 3, [120, 0, 40, 40], 0.9), _result(5, 3, [50, 50, 40, 40], 0.8)]
    metrics, _ = coco_eval.coco_box_metrics(path, results)
    assert metrics['AP'] == pytest.approx(0.5)
    assert metrics['AP50'] == pytest.approx(0.5)
    assert metrics['APm'] == pytest.approx(0.5)  # both boxes are medium (area 40 x 40)


def test_no_detections_give_zero(ground_truth):
    metrics, summary = coco_eval.coco_box_metrics(ground_truth, [])
    assert metrics == dict.fromkeys(coco_eval.METRIC_NAMES, 0.0)
    assert summary.count('Average Precision') == 6


def test_restricted_to_the_evaluated_images(ground_truth):
    # Image 2 detected perfectly; images 1 and 3 not evaluated, so their objects are not missed.
    results = [_result(2, c, bbox, 0.7) for c, bbox in OBJECTS[2]]
    metrics, _ = coco_eval.coco_box_metrics(ground_truth, results, image_ids=[2])
    assert (
        metrics['AP'] == pytest.approx(1.0) and metrics['APl'] == -1.0
    )  # image 2 has no large object
    everything, _ = coco_eval.coco_box_metrics(ground_truth, results)
    assert everything['AP'] < 1.0
    with pytest.raises(ValueError, match=r'results name images that are not evaluated: \[2\]'):
        coco_eval.coco_box_metrics(ground_truth, results, image_ids=[1])
    with pytest.raises(ValueError, match=r'image_ids not in the annotations: \[9\]'):
        coco_eval.coco_box_metrics(ground_truth, results, image_ids=[2, 9])
    with pytest.raises(ValueError, match=r'categories not in the annotations: \[2\]'):
        coco_eval.coco_box_metrics(ground_truth, [_result(2, 2, [0, 0, 5, 5], 0.5)])


def test_matches_pycocotools_called_directly(ground_truth):
    # Noisy detections of every object plus random false positives, scored at random.
    rng = np.random.RandomState(0)
    results = []
    for image_id, boxes in OBJECTS.items():
        for category_id, (x, y, w, h) in boxes:
            for _ in range(3):
                jitter = rng.uniform(-0.25, 0.25, 4) * [w, h, w, h]
                bbox = [x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]]
                results.append(_result(image_id, category_id, bbox, float(rng.rand())))
        for _ in range(4):
            x, y = rng.uniform(0, 150, 2)
            w, h = rng.uniform(5, 50, 2)
            category_id = int(rng.choice([1, 3]))
            results.append(_result(image_id, category_id, [x, y, w, h], float(rng.rand())))
    kept = [dict(r) for r in results]
    metrics, summary = coco_eval.coco_box_metrics(ground_truth, results)
    assert results == kept  # the caller's entries are left as they were

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        gt = COCO(ground_truth)
        evaluation = COCOeval(gt, gt.loadRes(results), iouType='bbox')
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert [metrics[n] for n in coco_eval.METRIC_NAMES] == evaluation.stats[:6].tolist()
    assert 0.0 < metrics['AP'] < metrics['AP50'] < 1.0  # a real, not a degenerate, case
    assert summary in out.getvalue()
    # A COCO object works as well as the file
    again, _ = coco_eval.coco_box_metrics(coco_eval.load_coco(ground_truth), results)
    assert again == metrics


def test_bad_annotation_files(tmp_path):
    with pytest.raises(FileNotFoundError, match='missing.json'):
        coco_eval.coco_box_metrics(str(tmp_path / 'missing.json'), [])
    bad = tmp_path / 'bad.json'
    bad.write_text('{"images": [')
    with pytest.raises(ValueError, match=r'bad\.json: malformed JSON'):
        coco_eval.coco_box_metrics(str(bad), [])
