"""Tests of the two-stage detectors' machinery (crossformer_jax.detection: proposals, sampling,
two_stage_losses) against straightforward NumPy implementations of MMDetection 2.x's rules, all
under jax.jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crossformer_jax.detection.anchors import AnchorGenerator
from crossformer_jax.detection.assignment import IGNORED, NEGATIVE, POSITIVE
from crossformer_jax.detection.boxes import CASCADE_BOX_STDS, MAX_LOG_SCALE, aligned_giou
from crossformer_jax.detection.postprocess import regress_by_class
from crossformer_jax.detection.proposals import generate_proposals
from crossformer_jax.detection.sampling import sample
from crossformer_jax.detection.two_stage_losses import (
    mask_loss,
    rcnn_loss,
    rcnn_targets,
    rpn_loss,
)

# Two levels, 3 anchors per position (side 16 at stride 8, 32 at stride 16): a 64 x 64 input
# has 8 x 8 x 3 + 4 x 4 x 3 = 240 anchors.
GENERATOR = AnchorGenerator(strides=(8, 16), octave_base_scale=2.0, scales_per_octave=1)
FEATURE_SIZES = [(8, 8), (4, 4)]

# -------------------------------------------------------------------------------------------------
# NumPy references: the rules written out directly.


def np_iou(a, b):
    """(N, 4), (M, 4) xyxy -> (N, M) IoU, no +1, 0 where the union is 0."""
    a, b = np.asarray(a, np.float64)[:, None], np.asarray(b, np.float64)[None]
    iw = np.maximum(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0)
    ih = np.maximum(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0)


def np_encode(anchors, boxes, stds=(1.0, 1.0, 1.0, 1.0)):
    anchors, boxes = np.asarray(anchors, np.float64), np.asarray(boxes, np.float64)
    pw, ph = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    gw, gh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    dx = ((boxes[:, 0] + boxes[:, 2]) - (anchors[:, 0] + anchors[:, 2])) / 2 / pw
    dy = ((boxes[:, 1] + boxes[:, 3]) - (anchors[:, 1] + anchors[:, 3])) / 2 / ph
    return np.stack([dx, dy, np.log(gw / pw), np.log(gh / ph)], -1) / np.asarray(stds)


def np_decode(anchors, deltas, height=None, width=None, stds=(1.0, 1.0, 1.0, 1.0)):
    """Decoded boxes, clipped to [0, width] x [0, height] when those are given."""
    anchors = np.asarray(anchors, np.float64)
    deltas = np.asarray(deltas, np.float64) * np.asarray(stds)
    px, py = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
    pw, ph = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    dw = np.clip(deltas[:, 2], -MAX_LOG_SCALE, MAX_LOG_SCALE)
    dh = np.clip(deltas[:, 3], -MAX_LOG_SCALE, MAX_LOG_SCALE)
    gx, gy = px + pw * deltas[:, 0], py + ph * deltas[:, 1]
    gw, gh = pw * np.exp(dw), ph * np.exp(dh)
    boxes = np.stack([gx - gw / 2, gy - gh / 2, gx + gw / 2, gy + gh / 2], -1)
    if height is None:
        return boxes
    return np.clip(boxes, 0, [width, height, width, height])


def np_proposals(objectness, deltas, height, width, pre_nms_top_k, iou_threshold, max_proposals):
    """One image: per level (H, W, A) logits and (H, W, A * 4) deltas -> (boxes, scores)."""
    boxes, scores, levels = [], [], []
    for level, (anchors, logits, level_deltas) in enumerate(
        zip(GENERATOR.grid_anchors(FEATURE_SIZES), objectness, deltas)
    ):
        level_scores = 1 / (1 + np.exp(-np.asarray(logits, np.float64).reshape(-1)))
        order = np.argsort(-level_scores, kind='stable')[:pre_nms_top_k]
        level_boxes = np_decode(anchors[order], level_deltas.reshape(-1, 4)[order], height, width)
        boxes.append(level_boxes)
        scores.append(level_scores[order])
        levels.append(np.full(len(order), level))
    boxes, scores, levels = map(np.concatenate, (boxes, scores, levels))
    large = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, scores, levels = boxes[large], scores[large], levels[large]
    order = np.argsort(-scores, kind='stable')
    keep = []
    for i in order:
        if all(
            levels[k] != levels[i]
            or np_iou(boxes[k : k + 1], boxes[i : i + 1])[0, 0] <= iou_threshold
            for k in keep
        ):
            keep.append(i)
    keep = keep[:max_proposals]
    return boxes[keep], scores[keep]


def np_assign(anchors, valid, gts, pos_iou, neg_iou, min_pos_iou, low_quality=True):
    """MaxIoUAssigner over the valid anchors -> (state, matched) per anchor."""
    state = np.full(len(anchors), IGNORED)
    matched = np.zeros(len(anchors), int)
    rows = np.flatnonzero(valid)
    if len(gts) == 0:
        state[rows] = NEGATIVE
        return state, matched
    iou = np_iou(anchors[rows], gts)
    best = iou.max(1)
    state[rows[best < neg_iou]] = NEGATIVE
    state[rows[best >= pos_iou]] = POSITIVE
    matched[rows] = iou.argmax(1)
    if low_quality:
        for g in range(len(gts)):
            if iou[:, g].max() >= min_pos_iou:
                at_max = rows[iou[:, g] == iou[:, g].max()]
                state[at_max], matched[at_max] = POSITIVE, g
    return state, matched


def bce(logits, targets):
    logits = np.asarray(logits, np.float64)
    return np.maximum(logits, 0) - logits * targets + np.log1p(np.exp(-np.abs(logits)))


# -------------------------------------------------------------------------------------------------
# Proposals.


def random_rpn_outputs(seed, batch=2):
    rng = np.random.default_rng(seed)
    objectness = [rng.normal(size=(batch, h, w, 3)).astype(np.float32) for h, w in FEATURE_SIZES]
    deltas = [
        (rng.normal(size=(batch, h, w, 12)) * 0.6).astype(np.float32) for h, w in FEATURE_SIZES
    ]
    deltas[0][0, 0, 0, 2] = 9.0  # beyond the dw clamp
    return objectness, deltas


@pytest.mark.parametrize('max_proposals', [30, 300])
def test_generate_proposals_matches_reference(max_proposals):
    objectness, deltas = random_rpn_outputs(0)
    image_shapes = np.array([[64, 64], [30, 44]], np.int32)
    propose = jax.jit(
        lambda o, d, s: generate_proposals(
            o, d, GENERATOR, s, pre_nms_top_k=50, iou_threshold=0.7, max_proposals=max_proposals
        )
    )
    boxes, scores, valid = propose(objectness, deltas, image_shapes)
    assert boxes.shape == (2, max_proposals, 4) and valid.shape == (2, max_proposals)
    for b, (height, width) in enumerate(image_shapes):
        ref_boxes, ref_scores = np_proposals(
            [o[b] for o in objectness],
            [d[b] for d in deltas],
            height,
            width,
            50,
            0.7,
            max_proposals,
        )
        count = len(ref_scores)
        assert int(valid[b].sum()) == count and bool(valid[b, :count].all())
        np.testing.assert_allclose(boxes[b, :count], ref_boxes, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(scores[b, :count], ref_scores, rtol=1e-6)
        assert float(jnp.abs(boxes[b, count:]).sum()) == 0.0
    # 50 + 48 boxes enter NMS; the first image keeps more than 30, so 30 fills every slot.
    assert bool(valid[0].all()) == (max_proposals == 30)


def test_generate_proposals_checks_channels():
    objectness, deltas = random_rpn_outputs(1)
    objectness = [np.concatenate([o, o], -1) for o in objectness]
    with pytest.raises(ValueError, match='objectness must have 3 channels'):
        generate_proposals(objectness, deltas, GENERATOR, np.array([[64, 64], [64, 64]]))


# -------------------------------------------------------------------------------------------------
# Sampling.


@pytest.mark.parametrize(
    'num_pos, num_neg, expected_pos, expected_neg',
    [(30, 600, 30, 482), (200, 600, 128, 384), (10, 20, 10, 20), (0, 700, 0, 512)],
)
def test_sample_counts_and_eligibility(num_pos, num_neg, expected_pos, expected_neg):
    rng = np.random.default_rng(num_pos)
    state = np.full(1000, IGNORED, np.int32)
    state[:num_pos], state[num_pos : num_pos + num_neg] = POSITIVE, NEGATIVE
    state = rng.permutation(state)
    draw = jax.jit(lambda s, key: sample(s, key, num=512, pos_fraction=0.25))
    indices, is_positive, valid = map(np.asarray, draw(state, jax.random.key(3)))
    assert is_positive.sum() == expected_pos and (valid & ~is_positive).sum() == expected_neg
    # Positives first, then negatives, then the invalid slots (index 0).
    assert (
        valid[: expected_pos + expected_neg].all()
        and not valid[expected_pos + expected_neg :].any()
    )
    assert is_positive[:expected_pos].all() and not is_positive[expected_pos:].any()
    assert (indices[~valid] == 0).all()
    chosen = indices[valid]
    assert len(np.unique(chosen)) == len(chosen)
    assert (state[indices[is_positive]] == POSITIVE).all()
    assert (state[indices[valid & ~is_positive]] == NEGATIVE).all()


def test_sample_is_uniform():
    # 5 positives, a quota of 2: each is drawn with probability 2 / 5; 6 negatives, 2 slots
    # left: 1 / 3.
    state = jnp.array([1, 0, -1, 1, 0, 0, 1, -1, 0, 1, 0, 1, 0], jnp.int32)
    keys = jax.random.split(jax.random.key(0), 6000)
    indices, is_positive, valid = jax.jit(
        jax.vmap(lambda key: sample(state, key, num=4, pos_fraction=0.5))
    )(keys)
    assert bool(valid.all()) and int(is_positive.sum()) == 2 * 6000
    counts = np.bincount(np.asarray(indices).reshape(-1), minlength=13) / 6000
    expected = np.where(np.asarray(state) == 1, 0.4, np.where(np.asarray(state) == 0, 1 / 3, 0))
    np.testing.assert_allclose(counts, expected, atol=0.025)
    # Different keys give different subsets.
    assert len({tuple(sorted(row)) for row in np.asarray(indices[:50]).tolist()}) > 10


# -------------------------------------------------------------------------------------------------
# RPN loss.

RPN_GT_BOXES = np.array(
    [
        [[4, 6, 30, 20], [20, 20, 52, 60], [40, 2, 47, 9]],
        [[2, 2, 20, 26], [0, 0, 0, 0], [0, 0, 0, 0]],
    ],
    np.float32,
)
RPN_GT_VALID = np.array([[True, True, True], [True, False, False]])
RPN_IMAGE_SHAPES = np.array([[64, 64], [30, 44]], np.int32)


def np_rpn_reference(objectness, deltas):
    """The full RPN loss with every positive and negative anchor sampled, the positives and
    samples of the batch and each image's (positives, negatives)."""
    anchors = np.concatenate(GENERATOR.grid_anchors(FEATURE_SIZES)).astype(np.float64)
    total_cls = total_l1 = 0.0
    num_pos = num_samples = 0
    counts = []
    for b, (height, width) in enumerate(RPN_IMAGE_SHAPES):
        pad_h, pad_w = -(-height // 32) * 32, -(-width // 32) * 32
        on_image = []
        for (h, w), stride in zip(FEATURE_SIZES, GENERATOR.strides):
            ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
            flags = (ys < -(-pad_h // stride)) & (xs < -(-pad_w // stride))
            on_image.append(np.repeat(flags.reshape(-1), 3))
        valid = np.concatenate(on_image)
        valid &= (anchors[:, 0] >= 0) & (anchors[:, 1] >= 0)
        valid &= (anchors[:, 2] < width) & (anchors[:, 3] < height)
        gts = RPN_GT_BOXES[b][RPN_GT_VALID[b]].astype(np.float64)
        state, matched = np_assign(anchors, valid, gts, 0.7, 0.3, 0.3)
        logits = np.concatenate([o[b].reshape(-1) for o in objectness])
        pred = np.concatenate([d[b].reshape(-1, 4) for d in deltas])
        pos, neg = state == POSITIVE, state == NEGATIVE
        total_cls += bce(logits[pos], 1).sum() + bce(logits[neg], 0).sum()
        targets = np_encode(anchors[pos], gts[matched[pos]])
        total_l1 += np.abs(pred[pos] - targets).sum()
        num_pos += pos.sum()
        num_samples += pos.sum() + neg.sum()
        counts.append((pos.sum(), neg.sum()))
    return total_cls / num_samples, total_l1 / num_samples, num_pos, num_samples, counts


def test_rpn_loss_matches_reference_when_everything_is_sampled():
    objectness, deltas = random_rpn_outputs(2)
    loss_fn = jax.jit(
        lambda o, d, key: rpn_loss(
            o,
            d,
            GENERATOR,
            RPN_GT_BOXES,
            RPN_GT_VALID,
            RPN_IMAGE_SHAPES,
            key,
            num_samples=1000,
            pos_fraction=1.0,
        )
    )
    loss, stats = loss_fn(objectness, deltas, jax.random.key(0))
    ref_cls, ref_l1, ref_pos, ref_samples, _ = np_rpn_reference(objectness, deltas)
    # The low-quality matches make the tiny third gt and the second image's gt positive.
    assert ref_pos >= 3 and int(stats['num_positives']) == ref_pos
    assert int(stats['num_samples']) == ref_samples
    np.testing.assert_allclose(stats['rpn_cls'], ref_cls, rtol=1e-5)
    np.testing.assert_allclose(stats['rpn_bbox'], ref_l1, rtol=1e-5)
    np.testing.assert_allclose(loss, ref_cls + ref_l1, rtol=1e-5)


def test_rpn_loss_sampling_counts_and_gradient():
    objectness, deltas = random_rpn_outputs(3)
    _, ref_l1, ref_pos, ref_samples, counts = np_rpn_reference(objectness, deltas)

    def loss_fn(o, d, key):
        return rpn_loss(
            o,
            d,
            GENERATOR,
            RPN_GT_BOXES,
            RPN_GT_VALID,
            RPN_IMAGE_SHAPES,
            key,
            num_samples=32,
            pos_fraction=0.5,
        )

    (loss, stats), grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(
        objectness, deltas, jax.random.key(1)
    )
    # Each image: min(positives, 16) positives, then min(negatives, 32 - those) negatives. The
    # first image has more negatives than slots, the second (30 x 44) fewer.
    expected = [(min(pos, 16), min(neg, 32 - min(pos, 16))) for pos, neg in counts]
    assert sum(pos for pos, _ in expected) == ref_pos and sum(map(sum, expected)) < 64
    assert expected[0][0] + expected[0][1] == 32 and counts[1][1] < 32 - expected[1][0]
    assert int(stats['num_positives']) == ref_pos
    num_samples = sum(map(sum, expected))
    assert int(stats['num_samples']) == num_samples
    # Every positive is sampled, so the L1 sum is the reference's.
    np.testing.assert_allclose(stats['rpn_bbox'], ref_l1 * ref_samples / num_samples, rtol=1e-5)
    # Exactly the sampled anchors receive an objectness gradient.
    touched = sum(int((np.asarray(g) != 0).sum()) for g in grads[0])
    assert touched == num_samples and np.isfinite(float(loss))


# -------------------------------------------------------------------------------------------------
# R-CNN targets and losses.

NUM_CLASSES = 4
RCNN_GT_BOXES = np.array(
    [
        [[10, 10, 40, 40], [50, 20, 90, 70], [0, 0, 0, 0]],
        [[5, 5, 60, 30], [0, 0, 0, 0], [0, 0, 0, 0]],
    ],
    np.float32,
)
RCNN_GT_CLASSES = np.array([[2, 0, 1], [3, 0, 0]], np.int32)
RCNN_GT_VALID = np.array([[True, True, False], [True, False, False]])


def random_proposals(seed, count):
    """(2, count, 4) proposals: jittered gt boxes (many positives) and random boxes."""
    rng = np.random.default_rng(seed)
    centres = RCNN_GT_BOXES[:, :1].repeat(count, 1)
    centres[0, 1::2] = RCNN_GT_BOXES[0, 1]
    jitter = rng.uniform(-8, 8, size=(2, count, 4))
    random = np.sort(rng.uniform(0, 100, size=(2, count, 2, 2)), axis=2).transpose(0, 1, 3, 2)
    random = random.reshape(2, count, 4)[..., [0, 2, 1, 3]]
    use_random = rng.random((2, count, 1)) < 0.5
    boxes = np.where(use_random, random, centres + jitter)
    boxes[..., 2:] = np.maximum(boxes[..., 2:], boxes[..., :2] + 1)
    return boxes.astype(np.float32)


def np_rcnn_reference(proposals, proposal_valid):
    """Per image: state, label, box targets (stds 0.1, 0.1, 0.2, 0.2) of the gts + proposals."""
    out = []
    for b in range(2):
        candidates = np.concatenate([RCNN_GT_BOXES[b], proposals[b]]).astype(np.float64)
        valid = np.concatenate([RCNN_GT_VALID[b], proposal_valid[b]])
        gts = RCNN_GT_BOXES[b].astype(np.float64)
        iou = np.where(RCNN_GT_VALID[b][None], np_iou(candidates, gts), -1)
        state = np.where(valid, np.where(iou.max(1) >= 0.5, POSITIVE, NEGATIVE), IGNORED)
        matched = iou.argmax(1)
        g = len(gts)
        state[:g] = np.where(RCNN_GT_VALID[b], POSITIVE, IGNORED)
        matched[:g] = np.arange(g)
        labels = np.where(state == POSITIVE, RCNN_GT_CLASSES[b][matched], NUM_CLASSES)
        targets = np.zeros((len(candidates), 4))
        pos = state == POSITIVE
        targets[pos] = np_encode(candidates[pos], gts[matched[pos]], (0.1, 0.1, 0.2, 0.2))
        out.append((candidates, state, matched, labels, targets))
    return out


def test_rcnn_targets_and_loss_match_reference_when_everything_is_sampled():
    proposals = random_proposals(0, 40)
    proposal_valid = np.random.default_rng(1).random((2, 40)) < 0.8
    targets = jax.jit(
        lambda p, v, key: rcnn_targets(
            p,
            v,
            RCNN_GT_BOXES,
            RCNN_GT_CLASSES,
            RCNN_GT_VALID,
            key,
            num_classes=NUM_CLASSES,
            num_samples=64,
            pos_fraction=1.0,
        )
    )(proposals, proposal_valid, jax.random.key(0))
    rng = np.random.default_rng(2)
    class_logits = rng.normal(size=(2, 64, NUM_CLASSES + 1)).astype(np.float32)
    box_deltas = rng.normal(size=(2, 64, NUM_CLASSES * 4)).astype(np.float32)
    loss, stats = jax.jit(rcnn_loss)(class_logits, box_deltas, targets)

    total_ce = total_l1 = 0.0
    num_samples = 0
    for b, (candidates, state, matched, labels, box_targets) in enumerate(
        np_rcnn_reference(proposals, proposal_valid)
    ):
        valid = np.asarray(targets['valid'][b])
        indices = np.asarray(targets['indices'][b])[valid]
        assert sorted(indices) == sorted(np.flatnonzero(state != IGNORED))
        is_positive = np.asarray(targets['is_positive'][b])[valid]
        np.testing.assert_array_equal(is_positive, state[indices] == POSITIVE)
        np.testing.assert_array_equal(targets['labels'][b][valid], labels[indices])
        np.testing.assert_allclose(targets['rois'][b][valid], candidates[indices])
        np.testing.assert_allclose(
            targets['box_targets'][b][valid], box_targets[indices], rtol=1e-5, atol=1e-5
        )
        np.testing.assert_array_equal(
            targets['matched_gt'][b][valid][is_positive], matched[indices][is_positive]
        )
        logits = class_logits[b][valid].astype(np.float64)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        total_ce -= log_probs[np.arange(len(indices)), labels[indices]].sum()
        own = box_deltas[b][valid].reshape(-1, NUM_CLASSES, 4)[
            is_positive, labels[indices][is_positive]
        ]
        total_l1 += np.abs(own - box_targets[indices][is_positive]).sum()
        num_samples += len(indices)
    # Every image has positives (its gts at least) and negatives.
    assert 0 < int(targets['is_positive'].sum()) < num_samples
    np.testing.assert_allclose(stats['rcnn_cls'], total_ce / num_samples, rtol=1e-5)
    np.testing.assert_allclose(stats['rcnn_bbox'], total_l1 / num_samples, rtol=1e-5)
    np.testing.assert_allclose(loss, (total_ce + total_l1) / num_samples, rtol=1e-5)


def np_giou(a, b):
    """Aligned generalised IoU, (N, 4), (N, 4) -> (N,), float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    iw = np.maximum(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0)
    ih = np.maximum(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0)
    area = lambda box: (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])  # noqa: E731
    union = area(a) + area(b) - iw * ih
    hull = (np.maximum(a[:, 2], b[:, 2]) - np.minimum(a[:, 0], b[:, 0])) * (
        np.maximum(a[:, 3], b[:, 3]) - np.minimum(a[:, 1], b[:, 1])
    )
    return iw * ih / union - (hull - union) / hull


def test_aligned_giou():
    boxes = np.asarray([[0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 4, 2]], np.float32)
    others = np.asarray([[2, 0, 3, 1], [0, 0, 2, 2], [1, 0, 3, 4]], np.float32)
    # Disjoint: IoU 0, hull 3, union 2; identical: 1; overlapping: 4 / 12 - (16 - 12) / 16.
    np.testing.assert_allclose(aligned_giou(boxes, others), [-1 / 3, 1, 4 / 12 - 4 / 16], 1e-6)
    a, b = random_proposals(8, 50)
    np.testing.assert_allclose(aligned_giou(a, b), np_giou(a, b), rtol=1e-5, atol=1e-6)
    # Degenerate boxes: union and hull clamped to 1e-6, no NaN.
    point = np.asarray([[5, 5, 5, 5]], np.float32)
    assert np.isfinite(aligned_giou(point, point)).all()


def test_giou_box_loss_decodes_the_own_class_deltas():
    """rcnn_loss(box_loss='giou'): 10 x (1 - GIoU) of each positive's own-class deltas decoded
    on its RoI (a cascade stage's stds, unclipped) against its gt, over the valid RoIs."""
    proposals = random_proposals(4, 40)
    stds = CASCADE_BOX_STDS[1]
    targets = jax.jit(
        lambda p, key: rcnn_targets(
            p,
            np.ones((2, 40), bool),
            RCNN_GT_BOXES,
            RCNN_GT_CLASSES,
            RCNN_GT_VALID,
            key,
            num_classes=NUM_CLASSES,
            num_samples=64,
            iou_threshold=0.6,
            box_stds=stds,
        )
    )(proposals, jax.random.key(5))
    rng = np.random.default_rng(6)
    class_logits = rng.normal(size=(2, 64, NUM_CLASSES + 1)).astype(np.float32)
    box_deltas = rng.normal(size=(2, 64, NUM_CLASSES * 4)).astype(np.float32)
    loss, stats = jax.jit(lambda *a: rcnn_loss(*a, box_loss='giou', box_stds=stds))(
        class_logits, box_deltas, targets
    )
    positive, valid = np.asarray(targets['is_positive']), np.asarray(targets['valid'])
    labels, rois = np.asarray(targets['labels']), np.asarray(targets['rois'])
    gts = np.take_along_axis(RCNN_GT_BOXES, np.asarray(targets['matched_gt'])[..., None], axis=1)
    np.testing.assert_array_equal(np.asarray(targets['matched_boxes'])[positive], gts[positive])
    own = np.take_along_axis(
        box_deltas.reshape(2, 64, NUM_CLASSES, 4),
        np.minimum(labels, NUM_CLASSES - 1)[..., None, None],
        axis=2,
    )[:, :, 0]
    decoded = np_decode(rois[positive], own[positive], stds=stds)
    expected = 10 * np.sum(1 - np_giou(decoded, gts[positive])) / valid.sum()
    assert 0 < positive.sum() < valid.sum()
    np.testing.assert_allclose(stats['rcnn_bbox'], expected, rtol=1e-5)
    np.testing.assert_allclose(loss, stats['rcnn_cls'] + expected, rtol=1e-5)
    with pytest.raises(ValueError, match="box_loss must be one of \\('l1', 'giou'\\), got 'l2'"):
        rcnn_loss(class_logits, box_deltas, targets, box_loss='l2')


def test_regress_by_class_moves_each_roi_by_its_label():
    rois = random_proposals(9, 30)
    rng = np.random.default_rng(10)
    deltas = rng.normal(size=(2, 30, NUM_CLASSES * 4)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, (2, 30)).astype(np.int32)
    shapes = np.asarray([[60, 90], [100, 70]], np.int32)
    stds = CASCADE_BOX_STDS[2]
    moved = jax.jit(lambda *a: regress_by_class(*a, stds))(rois, deltas, labels, shapes)
    for b in range(2):
        own = deltas[b].reshape(30, NUM_CLASSES, 4)[np.arange(30), labels[b]]
        expected = np_decode(rois[b], own, shapes[b, 0], shapes[b, 1], stds)
        np.testing.assert_allclose(moved[b], expected, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match=r'rois and box_deltas must be \(2, 30, 4\)'):
        regress_by_class(rois[:, :5], deltas, labels, shapes)


def test_rcnn_targets_default_sampling_counts():
    proposals = random_proposals(3, 1000)
    proposal_valid = np.ones((2, 1000), bool)
    targets = jax.jit(
        lambda p, v, key: rcnn_targets(
            p, v, RCNN_GT_BOXES, RCNN_GT_CLASSES, RCNN_GT_VALID, key, num_classes=NUM_CLASSES
        )
    )(proposals, proposal_valid, jax.random.key(1))
    assert targets['rois'].shape == (2, 512, 4)
    for b, (_, state, _, labels, _) in enumerate(np_rcnn_reference(proposals, proposal_valid)):
        expected_pos = min((state == POSITIVE).sum(), 128)
        expected_neg = min((state == NEGATIVE).sum(), 512 - expected_pos)
        assert (state == POSITIVE).sum() > 128  # the quota binds
        assert int(targets['is_positive'][b].sum()) == expected_pos
        assert int(targets['valid'][b].sum()) == expected_pos + expected_neg
        indices = np.asarray(targets['indices'][b])
        np.testing.assert_array_equal(
            targets['labels'][b],
            np.where(
                np.asarray(targets['valid'][b]) & (state[indices] == POSITIVE),
                labels[indices],
                NUM_CLASSES,
            ),
        )


def test_mask_loss_matches_reference():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(2, 5, 6, 6, NUM_CLASSES)).astype(np.float32)
    targets = (rng.random((2, 5, 6, 6)) > 0.5).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=(2, 5)).astype(np.int32)
    is_positive = rng.random((2, 5)) < 0.5
    is_positive[0, 0] = True
    loss = jax.jit(mask_loss)(logits, targets, labels, is_positive)
    b, r = np.nonzero(is_positive)
    own = logits[b, r, :, :, labels[b, r]]
    np.testing.assert_allclose(loss, bce(own, targets[b, r]).mean(), rtol=1e-5)
    assert float(mask_loss(logits, targets, labels, np.zeros((2, 5), bool))) == 0.0
