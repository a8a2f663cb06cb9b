"""Tests of the detection machinery (crossformer_jax.detection): anchors, box coding and IoU, the
MaxIoU assignment, RetinaNet's loss and the on-device post-processing, against hand-computed
numbers and straightforward NumPy implementations of the MMDetection rules, all under jax.jit."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crossformer_jax.detection import anchors as anchors_lib
from crossformer_jax.detection.anchors import AnchorGenerator, pad_shape
from crossformer_jax.detection.assignment import assign_anchors
from crossformer_jax.detection.boxes import MAX_LOG_SCALE, box_iou, decode_deltas, encode_deltas
from crossformer_jax.detection.losses import retinanet_loss, sigmoid_focal_loss
from crossformer_jax.detection.postprocess import detect, rcnn_detect

GENERATOR = AnchorGenerator()

# -------------------------------------------------------------------------------------------------
# NumPy references: the rules written out directly.


def np_iou(a, b):
    """IoU of an xyxy box a (4,) with boxes b (..., 4) in float32 (no +1; 0 where the union is
    0) -> (...)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    iw = np.maximum(np.minimum(a[2], b[..., 2]) - np.maximum(a[0], b[..., 0]), np.float32(0))
    ih = np.maximum(np.minimum(a[3], b[..., 3]) - np.maximum(a[1], b[..., 1]), np.float32(0))
    inter = iw * ih
    union = (
        (a[2] - a[0]) * (a[3] - a[1]) + (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]) - inter
    )
    return np.where(union > 0, inter / np.where(union > 0, union, np.float32(1)), np.float32(0))


def np_assign(anchors, anchor_valid, gts, gt_valid, pos_iou=0.5, neg_iou=0.4, min_pos_iou=0.0):
    """MaxIoUAssigner on the valid anchors and gts, one loop per rule: (matched gt, state)."""
    anchor_ids = np.flatnonzero(anchor_valid)
    gt_ids = np.flatnonzero(gt_valid)
    matched = np.zeros(len(anchors), np.int32)
    state = np.full(len(anchors), -1, np.int32)
    if len(gt_ids) == 0:
        state[anchor_ids] = 0
        return matched, state
    overlaps = np.array([[np_iou(anchors[a], gts[g]) for g in gt_ids] for a in anchor_ids])
    for row, a in enumerate(anchor_ids):
        best = int(np.argmax(overlaps[row]))
        if 0 <= overlaps[row, best] < neg_iou:
            state[a] = 0
        if overlaps[row, best] >= pos_iou:
            state[a], matched[a] = 1, gt_ids[best]
    for column, g in enumerate(gt_ids):
        gt_max = overlaps[:, column].max() if len(anchor_ids) else -1.0
        if gt_max >= min_pos_iou:
            for row, a in enumerate(anchor_ids):
                if overlaps[row, column] == gt_max:
                    state[a], matched[a] = 1, g
    return matched, state


def np_valid_flags(feature_sizes, pad_shapes, strides, num_anchors):
    """Per level (B, H*W*A) bool, by looping over the positions."""
    flags = []
    for (h, w), stride in zip(feature_sizes, strides):
        level = np.zeros((len(pad_shapes), h, w, num_anchors), bool)
        for i, (pad_h, pad_w) in enumerate(pad_shapes):
            for y in range(h):
                for x in range(w):
                    level[i, y, x] = y < math.ceil(pad_h / stride) and x < math.ceil(pad_w / stride)
        flags.append(level.reshape(len(pad_shapes), -1))
    return flags


def np_encode(anchor, target):
    px, py = (anchor[0] + anchor[2]) / 2, (anchor[1] + anchor[3]) / 2
    pw, ph = anchor[2] - anchor[0], anchor[3] - anchor[1]
    gx, gy = (target[0] + target[2]) / 2, (target[1] + target[3]) / 2
    gw, gh = target[2] - target[0], target[3] - target[1]
    return np.array([(gx - px) / pw, (gy - py) / ph, np.log(gw / pw), np.log(gh / ph)])


def np_decode(anchor, delta, height, width):
    px, py = (anchor[0] + anchor[2]) / 2, (anchor[1] + anchor[3]) / 2
    pw, ph = anchor[2] - anchor[0], anchor[3] - anchor[1]
    dw, dh = np.clip(delta[2:], -MAX_LOG_SCALE, MAX_LOG_SCALE)
    gx, gy = px + pw * delta[0], py + ph * delta[1]
    gw, gh = pw * np.exp(dw), ph * np.exp(dh)
    box = np.array([gx - gw / 2, gy - gh / 2, gx + gw / 2, gy + gh / 2])
    return np.clip(box, 0, [width, height, width, height])


def np_focal(logit, target, alpha=0.25, gamma=2.0):
    p = 1 / (1 + np.exp(-np.float64(logit)))
    if target == 1:
        return -alpha * (1 - p) ** gamma * np.log(p)
    return -(1 - alpha) * p**gamma * np.log(1 - p)


def np_detect(
    class_logits, box_deltas, generator, image_shapes, pre_nms_top_k, threshold, iou, max_detections
):
    """Per image: top-k per level by max score, decode + clip, then greedy class-wise NMS over
    every candidate above the threshold (no truncation), the first max_detections keeps."""
    sizes = [x.shape[1:3] for x in class_logits]
    level_anchors = generator.grid_anchors(sizes)
    num_classes = class_logits[0].shape[-1] // generator.num_anchors
    results = []
    for i, (height, width) in enumerate(image_shapes):
        scores_all, boxes_all = [], []
        for anchors, logits, deltas in zip(level_anchors, class_logits, box_deltas):
            scores = 1 / (1 + np.exp(-logits[i].reshape(-1, num_classes).astype(np.float64)))
            deltas = deltas[i].reshape(-1, 4).astype(np.float64)
            keep = np.argsort(-scores.max(axis=1), kind='stable')[:pre_nms_top_k]
            scores_all.append(scores[keep])
            boxes_all.append(
                np.array([np_decode(anchors[k], deltas[k], height, width) for k in keep])
            )
        scores = np.concatenate(scores_all).reshape(-1)
        boxes = np.concatenate(boxes_all)
        order = np.array([j for j in np.argsort(-scores, kind='stable') if scores[j] > threshold])
        order_boxes, order_classes = boxes[order // num_classes], order % num_classes
        kept, suppressed = [], np.zeros(len(order), bool)
        for rank, j in enumerate(order):
            if suppressed[rank]:
                continue
            kept.append(j)
            # the later candidates of its class overlapping it by more than iou
            later = np.arange(len(order)) > rank
            same_class = order_classes == order_classes[rank]
            suppressed |= later & same_class & (np_iou(order_boxes[rank], order_boxes) > iou)
        kept = kept[:max_detections]
        results.append(
            dict(
                boxes=boxes[[j // num_classes for j in kept]].reshape(-1, 4),
                scores=scores[kept],
                classes=np.array([j % num_classes for j in kept], np.int32),
            )
        )
    return results


# -------------------------------------------------------------------------------------------------
# Anchors.


def test_base_anchors_of_stride_8():
    base = GENERATOR.base_anchors(0)
    assert base.dtype == np.float32 and base.shape == (9, 4)
    s = 8 * 4 * 2.0 ** (np.arange(3) / 3)  # sides of the square anchors: 32, 40.32, 50.80
    r = math.sqrt(2)
    # ratio-major: ratio 0.5 (wide) scales 0..2, ratio 1, ratio 2 (tall)
    expected = np.concatenate(
        [
            np.stack([-s * r / 2, -s / r / 2, s * r / 2, s / r / 2], axis=1),
            np.stack([-s / 2, -s / 2, s / 2, s / 2], axis=1),
            np.stack([-s / r / 2, -s * r / 2, s / r / 2, s * r / 2], axis=1),
        ]
    )
    np.testing.assert_allclose(base, expected, rtol=1e-6)
    np.testing.assert_allclose(base[0], [-22.627417, -11.313708, 22.627417, 11.313708], rtol=1e-6)
    np.testing.assert_array_equal(base[3], [-16, -16, 16, 16])
    np.testing.assert_allclose(base[4], [-20.158737] * 2 + [20.158737] * 2, rtol=1e-6)
    np.testing.assert_allclose(GENERATOR.base_anchors(4), GENERATOR.base_anchors(0) * 16, rtol=1e-6)
    with pytest.raises(ValueError, match=r'level must be in \[0, 5\), got 5'):
        GENERATOR.base_anchors(5)


def test_grid_anchors_order_and_feature_sizes():
    assert GENERATOR.feature_sizes(800, 1344) == [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]
    assert GENERATOR.feature_sizes(64, 96) == [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
    grid = GENERATOR.grid_anchors([(2, 3), (1, 2), (1, 1), (1, 1), (1, 1)])
    assert [g.shape for g in grid] == [(54, 4), (18, 4), (9, 4), (9, 4), (9, 4)]
    assert all(g.dtype == np.float32 for g in grid)
    base = GENERATOR.base_anchors(0)
    # (y, x, a) order: row 1, column 2, anchor 4 sits at shift (16, 8)
    np.testing.assert_array_equal(grid[0][(1 * 3 + 2) * 9 + 4], base[4] + [16, 8, 16, 8])
    np.testing.assert_array_equal(grid[0][(0 * 3 + 1) * 9 + 0], base[0] + [8, 0, 8, 0])
    np.testing.assert_array_equal(grid[1][9 + 3], GENERATOR.base_anchors(1)[3] + [16, 0, 16, 0])
    with pytest.raises(ValueError, match='expected 5 feature sizes'):
        GENERATOR.grid_anchors([(2, 3)])
    with pytest.raises(ValueError, match='input size must be positive'):
        GENERATOR.feature_sizes(0, 32)
    with pytest.raises(ValueError, match='strides that double'):
        AnchorGenerator(strides=(8, 32)).feature_sizes(64, 64)


def test_valid_flags_and_pad_shape():
    np.testing.assert_array_equal(
        pad_shape(np.array([[800, 1333], [1, 33], [64, 64]])), [[800, 1344], [32, 64], [64, 64]]
    )
    assert isinstance(pad_shape(jnp.array([[5, 6]])), jax.Array)
    with pytest.raises(ValueError, match=r'image_sizes must be \(B, 2\)'):
        pad_shape(np.zeros((3,), int))

    sizes = GENERATOR.feature_sizes(64, 96)
    pad_shapes = np.array([[64, 96], [32, 64], [64, 32]], np.int32)
    flags = jax.jit(lambda p: GENERATOR.valid_flags(sizes, p))(pad_shapes)
    expected = np_valid_flags(sizes, pad_shapes, GENERATOR.strides, 9)
    for got, want in zip(flags, expected):
        assert got.dtype == jnp.bool_
        np.testing.assert_array_equal(np.asarray(got), want)
    # image 1 (32 x 64) at stride 8: rows 0..3, columns 0..7 of the 8 x 12 map, 9 anchors each
    assert int(flags[0][1].sum()) == 4 * 8 * 9 and bool(flags[0][1][(3 * 12 + 7) * 9 + 8])
    assert not bool(flags[0][1][(3 * 12 + 8) * 9])
    # stride 64 (1 x 2 map): the second column is past image 1's and image 2's padded width
    np.testing.assert_array_equal(
        np.asarray(flags[3]).reshape(3, 2, 9)[:, :, 0], [[1, 1], [1, 0], [1, 0]]
    )


def test_output_sizes_checks_the_head_outputs():
    logits = [jnp.zeros((2, h, w, 9 * 3)) for h, w in GENERATOR.feature_sizes(64, 64)]
    deltas = [jnp.zeros((2, h, w, 36)) for h, w in GENERATOR.feature_sizes(64, 64)]
    sizes, num_classes = GENERATOR.output_sizes(logits, deltas)
    assert sizes == [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)] and num_classes == 3
    with pytest.raises(ValueError, match='expected 5 levels'):
        GENERATOR.output_sizes(logits[:4], deltas[:4])
    with pytest.raises(ValueError, match=r'box deltas of level 2: expected \(2, 2, 2, 36\)'):
        GENERATOR.output_sizes(logits, [*deltas[:2], jnp.zeros((2, 2, 2, 32)), *deltas[3:]])
    with pytest.raises(ValueError, match=r'class logits of level 0 must be \(B, H, W, 9 \* K\)'):
        GENERATOR.output_sizes([jnp.zeros((2, 8, 8, 10)), *logits[1:]], deltas)


# -------------------------------------------------------------------------------------------------
# Boxes.


def test_box_iou_known_values_and_broadcasting():
    boxes1 = jnp.array([[0, 0, 2, 2], [0, 0, 10, 10], [3, 3, 3, 3]], jnp.float32)
    boxes2 = jnp.array([[1, 1, 3, 3], [0, 0, 10, 10], [20, 20, 30, 40], [3, 3, 3, 3]], jnp.float32)
    iou = np.asarray(jax.jit(box_iou)(boxes1, boxes2))
    expected = [
        [1 / 7, 4 / 100, 0, 0],
        [4 / 100, 1, 0, 0],
        [0, 0, 0, 0],  # zero area: union 0 with itself
    ]
    np.testing.assert_allclose(iou, expected, rtol=1e-6)
    batched = jax.jit(box_iou)(jnp.stack([boxes1, boxes1 + 1]), boxes2[None])
    assert batched.shape == (2, 3, 4)
    np.testing.assert_allclose(batched[1, 0, 0], 1.0)  # [1, 1, 3, 3] with itself
    with pytest.raises(ValueError, match=r'boxes2 must be \(\.\.\., 4\), got shape \(4, 3\)'):
        box_iou(boxes1, boxes2[:, :3])


def test_encode_decode_known_values_and_round_trip():
    anchor = jnp.array([0.0, 0.0, 10.0, 10.0])
    target = jnp.array([5.0, 5.0, 15.0, 25.0])
    np.testing.assert_allclose(
        jax.jit(encode_deltas)(anchor, target), [0.5, 1.0, 0.0, math.log(2)], rtol=1e-6
    )
    stds = (0.1, 0.1, 0.2, 0.2)
    np.testing.assert_allclose(
        encode_deltas(anchor, target, stds), [5.0, 10.0, 0.0, math.log(2) / 0.2], rtol=1e-6
    )
    np.testing.assert_allclose(
        decode_deltas(anchor, jnp.array([0.5, 1.0, 0.0, math.log(2)])), target, rtol=1e-6
    )
    # dw, dh clamp at |log(16 / 1000)|: at most 62.5 times the anchor's side
    wide = decode_deltas(anchor, jnp.array([0.0, 0.0, 10.0, -10.0]))
    np.testing.assert_allclose(wide, [5 - 312.5, 5 - 0.08, 5 + 312.5, 5 + 0.08], rtol=1e-5)
    # clipping to (height, width) = (20, 30), broadcast over the batch
    clipped = decode_deltas(
        jnp.stack([anchor, anchor]), jnp.array([[0.0, 0.0, 2.0, 2.0]] * 2), max_shape=[[20, 30]]
    )
    np.testing.assert_allclose(clipped, [[0, 0, 30, 20]] * 2, rtol=1e-6)

    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 100, (2, 50, 2))
    anchors = np.concatenate([corners[0], corners[0] + rng.uniform(4, 60, (50, 2))], -1)
    targets = np.concatenate([corners[1], corners[1] + rng.uniform(4, 60, (50, 2))], -1)
    anchors, targets = anchors.astype(np.float32), targets.astype(np.float32)
    round_trip = jax.jit(
        lambda a, t: decode_deltas(a, encode_deltas(a, t, stds), stds, max_shape=[200, 200])
    )
    np.testing.assert_allclose(round_trip(anchors, targets), targets, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(
        encode_deltas(anchors, targets),
        [np_encode(a, t) for a, t in zip(anchors, targets)],
        rtol=1e-4,
        atol=1e-5,
    )


# -------------------------------------------------------------------------------------------------
# Assignment.

assign_batch = jax.jit(jax.vmap(assign_anchors))


def test_assign_known_case():
    anchors = np.array(
        [[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30], [5, 0, 15, 10], [0, 0, 10, 10]],
        np.float32,
    )
    anchor_valid = np.array([True, True, True, True, False])
    gts = np.array([[0, 0, 10, 10], [20, 20, 24, 24], [0, 0, 10, 10]], np.float32)
    gt_valid = np.array([True, True, False])  # the padded gt would match anchors 0, 1 fully
    matched, state = jax.jit(assign_anchors)(anchors, anchor_valid, gts, gt_valid)
    # anchors 0, 1: IoU 1 with gt 0; anchor 2: IoU 0.16 with gt 1 but gt 1's best (low quality);
    # anchor 3: IoU 1/3 (negative); anchor 4: invalid (ignored)
    np.testing.assert_array_equal(state, [1, 1, 1, 0, -1])
    np.testing.assert_array_equal(matched, [0, 0, 1, 0, 0])
    # a duplicate gt: the later one takes the anchors at its max IoU
    matched, state = assign_anchors(anchors, anchor_valid, gts, np.ones(3, bool))
    np.testing.assert_array_equal(state, [1, 1, 1, 0, -1])
    np.testing.assert_array_equal(matched, [2, 2, 1, 0, 0])
    # no valid gt (and no gt at all): every valid anchor is negative
    for boxes, valid in ((gts, np.zeros(3, bool)), (gts[:0], np.zeros(0, bool))):
        matched, state = assign_anchors(anchors, anchor_valid, boxes, valid)
        np.testing.assert_array_equal(state, [0, 0, 0, 0, -1])
        np.testing.assert_array_equal(matched, 0)
    with pytest.raises(
        ValueError, match=r'gt_valid must be \(3,\) like gt_boxes, got shape \(2,\)'
    ):
        assign_anchors(anchors, anchor_valid, gts, gt_valid[:2])


def random_scene(rng, num_anchors=300, num_gts=8):
    """Anchors with exact duplicates, valid flags, gts with a duplicate, tiny (low-quality) gts
    and padded gts over well-covered areas."""
    xy = rng.uniform(0, 120, (num_anchors, 2))
    anchors = np.concatenate([xy, xy + rng.uniform(8, 40, (num_anchors, 2))], -1)
    anchors[num_anchors // 2 : num_anchors // 2 + 40] = anchors[:40]  # duplicates: tied IoUs
    anchor_valid = rng.random(num_anchors) < 0.9
    xy = rng.uniform(0, 120, (num_gts, 2))
    gts = np.concatenate([xy, xy + rng.uniform(4, 40, (num_gts, 2))], -1)
    gts[1, 2:] = gts[1, :2] + 3  # tiny: its best anchors are low-quality matches
    gts[4] = gts[2]  # duplicate gt: the later wins
    gt_valid = np.ones(num_gts, bool)
    gt_valid[-2:] = False
    gts[-1] = anchors[5]  # a padded gt that would match anchor 5 exactly
    return anchors.astype(np.float32), anchor_valid, gts.astype(np.float32), gt_valid


def test_assign_matches_the_reference_on_random_scenes():
    rng = np.random.default_rng(1)
    scenes = [random_scene(rng) for _ in range(4)]
    anchors, anchor_valid, gts, gt_valid = (np.stack(x) for x in zip(*scenes))
    matched, state = assign_batch(anchors, anchor_valid, gts, gt_valid)
    for i in range(len(scenes)):
        want_matched, want_state = np_assign(anchors[i], anchor_valid[i], gts[i], gt_valid[i])
        np.testing.assert_array_equal(state[i], want_state)
        np.testing.assert_array_equal(np.where(want_state == 1, matched[i], 0), want_matched)
        positive_gts = set(want_matched[want_state == 1].tolist())
        # gts 0, 1, 3, 4, 5 have positives (gt 4's best anchors over its duplicate gt 2's); the
        # padded gts 6, 7 have none
        assert {0, 1, 3, 4, 5} <= positive_gts <= {0, 1, 2, 3, 4, 5}
        assert (want_state == 0).sum() > 100 and (want_state == -1).sum() > 0
    # a gt overlapping no anchor: max IoU 0 >= min_pos_iou, so every anchor at IoU 0 is positive
    a, v, g, gv = scenes[0]
    g = g.copy()
    g[0] = [1000, 1000, 1010, 1010]
    matched, state = assign_anchors(a, v, g, gv)
    want_matched, want_state = np_assign(a, v, g, gv)
    np.testing.assert_array_equal(state, want_state)
    np.testing.assert_array_equal(np.where(want_state == 1, matched, 0), want_matched)
    assert ((want_matched == 0) & (want_state == 1)).sum() > 200
    # with min_pos_iou 0.3 the tiny gt 1 (IoU < 0.3 with every anchor) gets no low-quality match
    matched, state = assign_anchors(*scenes[1], min_pos_iou=0.3)
    want_matched, want_state = np_assign(*scenes[1], min_pos_iou=0.3)
    np.testing.assert_array_equal(state, want_state)
    np.testing.assert_array_equal(np.where(want_state == 1, matched, 0), want_matched)
    assert not np.any((want_matched == 1) & (want_state == 1))


# -------------------------------------------------------------------------------------------------
# Losses.


def test_sigmoid_focal_loss_formula_and_stability():
    logits = np.array([-30.0, -4.0, -0.5, 0.0, 0.7, 3.0, 25.0], np.float32)
    for target in (0, 1):
        got = jax.jit(sigmoid_focal_loss)(logits, np.full(logits.shape, target, np.float32))
        assert got.dtype == jnp.float32
        want = [np_focal(x, target) for x in logits]
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-30)
    # alpha and gamma; a (..., K) shape
    got = sigmoid_focal_loss(logits.reshape(1, 7), np.ones((1, 7)), alpha=0.5, gamma=1.0)
    np.testing.assert_allclose(got[0], [np_focal(x, 1, 0.5, 1.0) for x in logits], rtol=2e-5)
    # far logits: finite losses (log(1 - p) = -logit) and gradients
    far = jnp.array([200.0, -200.0])
    np.testing.assert_allclose(sigmoid_focal_loss(far, jnp.zeros(2)), [0.75 * 200, 0.0])
    np.testing.assert_allclose(sigmoid_focal_loss(far, jnp.ones(2)), [0.0, 0.25 * 200])
    grad = jax.grad(lambda x: sigmoid_focal_loss(x, jnp.array([0.0, 1.0])).sum())(far)
    np.testing.assert_allclose(grad, [0.75, -0.25])


def loss_inputs(rng, num_classes=3):
    """A batch of 3 images padded to 64 x 64: two gts and a padded one; one gt in an image of
    32 x 64 (anchors below it invalid); no gt."""
    sizes = GENERATOR.feature_sizes(64, 64)
    class_logits = [
        rng.normal(-2, 1.5, (3, h, w, 9 * num_classes)).astype(np.float32) for h, w in sizes
    ]
    box_deltas = [rng.normal(0, 0.5, (3, h, w, 36)).astype(np.float32) for h, w in sizes]
    gt_boxes = np.array(
        [
            [[4, 6, 40, 30], [30, 20, 62, 60], [0, 0, 0, 0]],
            [[10, 2, 50, 28], [0, 0, 0, 0], [0, 0, 0, 0]],
            [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
        ],
        np.float32,
    )
    gt_classes = np.array([[2, 0, 0], [1, 0, 0], [0, 0, 0]], np.int32)
    gt_valid = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]], bool)
    pad_shapes = np.array([[64, 64], [32, 64], [64, 64]], np.int32)
    return class_logits, box_deltas, gt_boxes, gt_classes, gt_valid, pad_shapes


def test_retinanet_loss_matches_numpy():
    rng = np.random.default_rng(2)
    class_logits, box_deltas, gt_boxes, gt_classes, gt_valid, pad_shapes = loss_inputs(rng)
    loss_fn = jax.jit(lambda cl, bd, *rest: retinanet_loss(cl, bd, GENERATOR, *rest))
    loss, stats = loss_fn(class_logits, box_deltas, gt_boxes, gt_classes, gt_valid, pad_shapes)

    sizes = [x.shape[1:3] for x in class_logits]
    anchors = np.concatenate(GENERATOR.grid_anchors(sizes))
    valid = np.concatenate(np_valid_flags(sizes, pad_shapes, GENERATOR.strides, 9), axis=1)
    focal = l1 = 0.0
    avg_factor = num_positives = 0
    states = []
    for i in range(3):
        logits = np.concatenate([x[i].reshape(-1, 3) for x in class_logits])
        deltas = np.concatenate([x[i].reshape(-1, 4) for x in box_deltas])
        matched, state = np_assign(anchors, valid[i], gt_boxes[i], gt_valid[i])
        states.append(state)
        for a in np.flatnonzero(state >= 0):
            for k in range(3):
                target = int(state[a] == 1 and gt_classes[i, matched[a]] == k)
                focal += np_focal(logits[a, k], target)
            if state[a] == 1:
                target = np_encode(anchors[a].astype(np.float64), gt_boxes[i, matched[a]])
                l1 += np.abs(deltas[a] - target).sum()
        avg_factor += max(int((state == 1).sum()), 1)
        num_positives += int((state == 1).sum())
    assert num_positives > 10
    np.testing.assert_allclose(stats['focal'], focal / avg_factor, rtol=1e-5)
    np.testing.assert_allclose(stats['l1'], l1 / avg_factor, rtol=1e-5)
    np.testing.assert_allclose(loss, (focal + l1) / avg_factor, rtol=1e-5)
    assert float(stats['num_positives']) == num_positives

    # finite gradients: the class logits' nonzero on the positive and negative anchors only (not
    # on ignored ones, image 1's below its 32 rows among them), the box deltas' on the positives
    targets = (gt_boxes, gt_classes, gt_valid, pad_shapes)
    grads = jax.jit(
        jax.grad(lambda cl, bd: retinanet_loss(cl, bd, GENERATOR, *targets)[0], argnums=(0, 1))
    )(class_logits, box_deltas)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    class_grads = np.concatenate([g.reshape(3, -1, 3) for g in grads[0]], axis=1)
    box_grads = np.concatenate([g.reshape(3, -1, 4) for g in grads[1]], axis=1)
    np.testing.assert_array_equal(np.all(class_grads != 0, axis=-1), np.stack(states) >= 0)
    np.testing.assert_array_equal(np.any(box_grads != 0, axis=-1), np.stack(states) == 1)


def test_retinanet_loss_rejects_bad_shapes():
    rng = np.random.default_rng(3)
    class_logits, box_deltas, gt_boxes, gt_classes, gt_valid, pad_shapes = loss_inputs(rng)
    with pytest.raises(ValueError, match=r'gt_classes must be \(3, 3\) like gt_boxes, got \(3,\)'):
        retinanet_loss(
            class_logits, box_deltas, GENERATOR, gt_boxes, gt_classes[:, 0], gt_valid, pad_shapes
        )
    with pytest.raises(ValueError, match=r'pad_shapes must be \(3, 2\), got shape \(2, 2\)'):
        retinanet_loss(
            class_logits, box_deltas, GENERATOR, gt_boxes, gt_classes, gt_valid, pad_shapes[:2]
        )


# -------------------------------------------------------------------------------------------------
# Post-processing.


def detect_inputs(num_classes=4):
    """Two images padded to 128 x 128 (image 1 is 100 x 90): distinct logits (no score ties),
    the highest ones at 4 "objects" per image (a class at 5 x 5 positions of level 0 and 3 x 3 of
    level 1, all anchors: clusters of overlapping boxes), small deltas."""
    rng = np.random.default_rng(4)
    sizes = GENERATOR.feature_sizes(128, 128)
    counts = [2 * h * w * 9 * num_classes for h, w in sizes]
    values = rng.permutation(np.linspace(-5.0, 2.0, sum(counts)).astype(np.float32))
    splits = np.split(values, np.cumsum(counts)[:-1])
    class_logits = [v.reshape(2, h, w, 9, num_classes) for v, (h, w) in zip(splits, sizes)]
    objects = np.zeros((2, 16, 16, 9, num_classes), bool), np.zeros((2, 8, 8, 9, num_classes), bool)
    for i in range(2):
        for y, x, c in zip(rng.integers(2, 12, 4), rng.integers(2, 12, 4), rng.permutation(4)):
            objects[0][i, y - 2 : y + 3, x - 2 : x + 3, :, c] = True
            objects[1][i, y // 2 - 1 : y // 2 + 2, x // 2 - 1 : x // 2 + 2, :, c] = True
    high = rng.permutation(np.linspace(2.5, 6.0, objects[0].sum() + objects[1].sum()))
    class_logits[0][objects[0]] = high[: objects[0].sum()]
    class_logits[1][objects[1]] = high[objects[0].sum() :]
    class_logits = [x.reshape(*x.shape[:3], -1) for x in class_logits]
    box_deltas = [rng.normal(0, 0.3, (2, h, w, 36)).astype(np.float32) for h, w in sizes]
    return class_logits, box_deltas, np.array([[128, 128], [100, 90]], np.int32)


def check_detections(got, want, count):
    """The first `count` detections of image i equal the reference's; the rest are padding."""
    assert int(got['num_detections']) == count
    np.testing.assert_array_equal(got['classes'][:count], want['classes'][:count])
    np.testing.assert_allclose(got['scores'][:count], want['scores'][:count], rtol=1e-6)
    np.testing.assert_allclose(got['boxes'][:count], want['boxes'][:count], rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(got['classes'][count:], -1)
    np.testing.assert_array_equal(got['scores'][count:], 0)
    np.testing.assert_array_equal(got['boxes'][count:], 0)


def test_detect_matches_full_greedy_nms():
    class_logits, box_deltas, image_shapes = detect_inputs()
    settings = dict(pre_nms_top_k=300, threshold=0.05, iou=0.5, max_detections=60)

    def run(max_candidates, threshold=0.05):
        fn = jax.jit(
            lambda cl, bd, shapes: detect(
                cl,
                bd,
                GENERATOR,
                shapes,
                pre_nms_top_k=300,
                score_threshold=threshold,
                max_detections=60,
                max_candidates=max_candidates,
            )
        )
        out = fn(class_logits, box_deltas, image_shapes)
        assert out['boxes'].shape == (2, 60, 4) and out['boxes'].dtype == jnp.float32
        assert out['classes'].dtype == jnp.int32 and out['num_detections'].dtype == jnp.int32
        return [{k: np.asarray(v[i]) for k, v in out.items()} for i in range(2)]

    want = np_detect(class_logits, box_deltas, GENERATOR, image_shapes, **settings)
    # N = 300 + 300 + 144 + 36 + 9 = 789 boxes, 3156 pairs: 4096 candidates hold all of them
    for got, ref in zip(run(4096), want):
        assert len(ref['classes']) == 60
        check_detections(got, ref, 60)
    # image 1's boxes lie inside its 100 x 90 shape
    assert want[1]['boxes'][:, 2].max() <= 90 and want[1]['boxes'][:, 3].max() <= 100
    assert want[1]['boxes'][:, 2].max() == 90  # some were clipped

    # 60 candidates: a prefix of the full result, shorter as the 60 best pairs hold fewer than 60
    # keeps (the objects' clusters suppress many)
    short = run(60)
    counts = [int(g['num_detections']) for g in short]
    assert counts == [45, 40]
    for got, ref, count in zip(short, want, counts):
        check_detections(got, ref, count)

    # a high threshold: fewer candidates than detections, the rest is padding
    want = np_detect(
        class_logits, box_deltas, GENERATOR, image_shapes, **{**settings, 'threshold': 0.997}
    )
    counts = [len(w['classes']) for w in want]
    assert counts == [47, 46]
    for got, ref, count in zip(run(4096, threshold=0.997), want, counts):
        check_detections(got, ref, count)


def test_detect_rejects_bad_settings():
    class_logits, box_deltas, image_shapes = detect_inputs()
    with pytest.raises(ValueError, match=r'max_candidates \(50\) must be at least max_detections'):
        detect(class_logits, box_deltas, GENERATOR, image_shapes, max_candidates=50)
    with pytest.raises(ValueError, match=r'image_shapes must be \(2, 2\)'):
        detect(class_logits, box_deltas, GENERATOR, image_shapes[:1])
    with pytest.raises(ValueError, match='pre_nms_top_k must be a positive integer'):
        detect(class_logits, box_deltas, GENERATOR, image_shapes, pre_nms_top_k=0)


def test_flatten_levels_follows_the_anchor_order():
    # channel a * K + k of position (y, x) is row (y * W + x) * A + a, column k
    x = jnp.arange(2 * 2 * 3 * 9 * 2).reshape(2, 2, 3, 18)
    flat = anchors_lib.flatten_levels([x, x[:, :1, :1]], 2)
    assert flat.shape == (2, 2 * 3 * 9 + 9, 2)
    assert int(flat[1, (1 * 3 + 2) * 9 + 4, 1]) == int(x[1, 1, 2, 4 * 2 + 1])
    assert int(flat[0, 54 + 8, 0]) == int(x[0, 0, 0, 16])


def test_rcnn_detect_matches_full_greedy_nms_with_class_specific_boxes():
    """The box head's post-processing: softmax without the background column, each RoI's deltas
    of each class decoded (stds 0.1, 0.1, 0.2, 0.2) and clipped, then class-wise greedy NMS over
    every (RoI, class) pair above the threshold; invalid RoIs detect nothing."""
    rng = np.random.default_rng(7)
    batch, num_rois, num_classes = 2, 60, 3
    centres = rng.uniform(20, 80, (batch, 6, 2))  # 6 objects per image, 10 RoIs around each
    sides = rng.uniform(10, 40, (batch, 6, 2))
    jitter = rng.normal(0, 2.0, (batch, 6, 10, 4))
    rois = np.concatenate([centres - sides / 2, centres + sides / 2], -1)[:, :, None] + jitter
    rois = rois.reshape(batch, num_rois, 4).astype(np.float32)
    logits = rng.normal(0, 2.0, (batch, num_rois, num_classes + 1)).astype(np.float32)
    deltas = rng.normal(0, 0.5, (batch, num_rois, 4 * num_classes)).astype(np.float32)
    valid = np.ones((batch, num_rois), bool)
    valid[1, 40:] = False
    image_shapes = np.array([[100, 100], [90, 70]], np.int32)
    got = jax.jit(rcnn_detect, static_argnames=('max_detections',))(
        logits, deltas, rois, valid, image_shapes, max_detections=20
    )
    stds = np.array([0.1, 0.1, 0.2, 0.2])
    for i in range(batch):
        height, width = image_shapes[i]
        z = logits[i].astype(np.float64)
        probs = np.exp(z - z.max(-1, keepdims=True))
        probs = (probs / probs.sum(-1, keepdims=True))[:, :num_classes]
        probs[~valid[i]] = 0
        boxes = np.array(
            [
                [
                    np_decode(rois[i, r], deltas[i, r, 4 * k : 4 * k + 4] * stds, height, width)
                    for k in range(num_classes)
                ]
                for r in range(num_rois)
            ]
        ).reshape(-1, 4)
        scores = probs.reshape(-1)
        order = [j for j in np.argsort(-scores, kind='stable') if scores[j] > 0.05]
        kept, suppressed = [], np.zeros(len(order), bool)
        for rank, j in enumerate(order):
            if suppressed[rank]:
                continue
            kept.append(j)
            for later in range(rank + 1, len(order)):
                other = order[later]
                if other % num_classes == j % num_classes and (
                    np_iou(boxes[j], boxes[other][None])[0] > 0.5
                ):
                    suppressed[later] = True
        kept = kept[:20]
        want = dict(boxes=boxes[kept], scores=scores[kept], classes=np.array(kept) % num_classes)
        check_detections(jax.tree.map(lambda x, i=i: np.asarray(x[i]), got), want, len(kept))
        assert len(kept) == 20 if i == 0 else len(kept) > 5  # NMS and the cap both at work
