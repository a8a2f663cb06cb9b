"""Training targets and losses of the two-stage detectors (MMDetection 2.x Mask R-CNN 1x):
the RPN's loss, the R-CNN's sampled RoIs with their targets, the box head's loss and the mask
head's loss. Static shapes throughout: ground truths padded to G with gt_valid, a fixed number of
sampled slots with a validity mask; everything jit-able."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from crossformer_jax.detection.anchors import AnchorGenerator, flatten_levels, pad_shape
from crossformer_jax.detection.assignment import IGNORED, POSITIVE, assign_anchors
from crossformer_jax.detection.boxes import (
    RCNN_BOX_STDS,
    aligned_giou,
    decode_deltas,
    encode_deltas,
)
from crossformer_jax.detection.sampling import sample

BOX_LOSSES = ('l1', 'giou')
GIOU_LOSS_WEIGHT = 10.0


def check_ground_truth(
    batch: int, gt_boxes: jax.Array, gt_valid: jax.Array, gt_classes: jax.Array | None = None
) -> None:
    """Raises ValueError unless gt_boxes is (B, G, 4) and gt_valid (and gt_classes) (B, G)."""
    if gt_boxes.ndim != 3 or gt_boxes.shape[0] != batch or gt_boxes.shape[-1] != 4:
        raise ValueError(f'gt_boxes must be (B={batch}, G, 4), got shape {tuple(gt_boxes.shape)}')
    gt_shape = gt_boxes.shape[:2]
    named = [('gt_valid', gt_valid)] + (
        [('gt_classes', gt_classes)] if gt_classes is not None else []
    )
    for name, array in named:
        if array.shape != gt_shape:
            raise ValueError(f'{name} must be {gt_shape} like gt_boxes, got {tuple(array.shape)}')


def anchor_inside_flags(
    anchors: jax.Array, image_shapes: jax.Array, allowed_border: float = 0.0
) -> jax.Array:
    """(N, 4) anchors, (B, 2) (height, width) -> (B, N) bool: the anchor lies inside the image
    (x1, y1 >= -allowed_border, x2 < width + allowed_border, y2 < height + allowed_border)."""
    height = image_shapes[:, 0, None].astype(jnp.float32)
    width = image_shapes[:, 1, None].astype(jnp.float32)
    return (
        (anchors[None, :, 0] >= -allowed_border)
        & (anchors[None, :, 1] >= -allowed_border)
        & (anchors[None, :, 2] < width + allowed_border)
        & (anchors[None, :, 3] < height + allowed_border)
    )


def rpn_loss(
    objectness: Sequence[jax.Array],
    deltas: Sequence[jax.Array],
    anchor_generator: AnchorGenerator,
    gt_boxes: jax.Array,
    gt_valid: jax.Array,
    image_shapes: jax.Array,
    rng: jax.Array,
    *,
    num_samples: int = 256,
    pos_fraction: float = 0.5,
    pos_iou: float = 0.7,
    neg_iou: float = 0.3,
    min_pos_iou: float = 0.3,
    allowed_border: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The RPN's loss of a batch, float32.

    objectness: per level (B, H_l, W_l, A) logits; deltas: per level (B, H_l, W_l, A * 4);
    gt_boxes (B, G, 4) xyxy in the resized image's pixels, gt_valid (B, G) bool (False: padding
    or a crowd box); image_shapes (B, 2) int: each image's resized, unpadded (height, width);
    rng: a PRNG key for the sampling.

    Anchors take part when they lie on the image's padded (to 32) extent and inside its
    (height, width) by allowed_border; they are assigned (MaxIoU: positive >= pos_iou, negative
    < neg_iou, low-quality matches for gts whose best IoU >= min_pos_iou) and num_samples of
    them drawn per image (at most pos_fraction positives). Returns (cls + bbox, dict(rpn_cls=,
    rpn_bbox=, num_positives=, num_samples=)): binary cross-entropy of the sampled anchors and
    L1 of the positives' deltas (stds 1), both divided by the batch's number of samples.
    """
    feature_sizes, channels = anchor_generator.output_sizes(objectness, deltas)
    if channels != 1:
        raise ValueError(
            f'objectness must have {anchor_generator.num_anchors} channels (one logit per '
            f'anchor), got {objectness[0].shape[-1]}'
        )
    batch = objectness[0].shape[0]
    check_ground_truth(batch, gt_boxes, gt_valid)
    image_shapes = jnp.asarray(image_shapes)
    if image_shapes.shape != (batch, 2):
        raise ValueError(
            f'image_shapes must be ({batch}, 2) (height, width), got shape '
            f'{tuple(image_shapes.shape)}'
        )

    anchors = jnp.concatenate(anchor_generator.grid_anchors(feature_sizes))  # (N, 4)
    on_image = jnp.concatenate(
        anchor_generator.valid_flags(feature_sizes, pad_shape(image_shapes)), axis=1
    )
    anchor_valid = on_image & anchor_inside_flags(anchors, image_shapes, allowed_border)
    gt_boxes = gt_boxes.astype(jnp.float32)

    def image_samples(valid, boxes, boxes_valid, key):
        matched, state = assign_anchors(
            anchors,
            valid,
            boxes,
            boxes_valid,
            pos_iou=pos_iou,
            neg_iou=neg_iou,
            min_pos_iou=min_pos_iou,
        )
        indices, is_positive, sampled = sample(
            state, key, num=num_samples, pos_fraction=pos_fraction
        )
        sampled_anchors = anchors[indices]
        # The positives' targets; the others encode their own anchor (zero deltas, no log of 0).
        targets = jnp.where(is_positive[:, None], boxes[matched[indices]], sampled_anchors)
        return indices, is_positive, sampled, encode_deltas(sampled_anchors, targets)

    indices, is_positive, sampled, box_targets = jax.vmap(image_samples)(
        anchor_valid, gt_boxes, gt_valid, jax.random.split(rng, batch)
    )  # (B, S), (B, S), (B, S), (B, S, 4)
    logits = jnp.take_along_axis(flatten_levels(objectness, 1)[..., 0], indices, axis=1)
    box_deltas = jnp.take_along_axis(flatten_levels(deltas, 4), indices[..., None], axis=1)

    cross_entropy = -jnp.where(is_positive, jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits))
    num_sampled = jnp.sum(sampled).astype(jnp.float32)
    avg_factor = jnp.maximum(num_sampled, 1.0)
    cls = jnp.sum(jnp.where(sampled, cross_entropy, 0.0)) / avg_factor
    positive = is_positive & sampled
    bbox = jnp.sum(jnp.where(positive[..., None], jnp.abs(box_deltas - box_targets), 0.0))
    bbox = bbox / avg_factor
    stats = dict(
        rpn_cls=cls,
        rpn_bbox=bbox,
        num_positives=jnp.sum(positive).astype(jnp.float32),
        num_samples=num_sampled,
    )
    return cls + bbox, stats


def rcnn_targets(
    proposals: jax.Array,
    proposal_valid: jax.Array,
    gt_boxes: jax.Array,
    gt_classes: jax.Array,
    gt_valid: jax.Array,
    rng: jax.Array,
    *,
    num_classes: int,
    num_samples: int = 512,
    pos_fraction: float = 0.25,
    iou_threshold: float = 0.5,
    box_stds: Sequence[float] = RCNN_BOX_STDS,
) -> dict[str, jax.Array]:
    """The RoIs of the R-CNN heads and their targets, for a batch.

    proposals (B, P, 4) xyxy with proposal_valid (B, P) bool (e.g. generate_proposals'
    outputs; no gradient flows into them); gt_boxes (B, G, 4), gt_classes (B, G) int32 in
    [0, num_classes), gt_valid (B, G) bool; rng: a PRNG key for the sampling.

    The gt boxes join the proposals (in front, as MMDetection's add_gt_as_proposals), each a
    positive of its own gt; the proposals are assigned by IoU (positive >= iou_threshold, matched
    to the best gt; negative below it; no low-quality matches) and num_samples RoIs drawn per
    image (at most pos_fraction positives). Returns, S = num_samples: indices (B, S) int32 into
    the G + P candidates (gts first, then proposals), rois (B, S, 4), labels
    (B, S) int32 (the matched gt's class for positives, num_classes (background) otherwise),
    box_targets (B, S, 4) (deltas / box_stds of the matched gt; zero for the others),
    matched_boxes (B, S, 4) (the matched gt box; the RoI itself for the others), matched_gt
    (B, S) int32 (the gt index of the positives, for the mask targets; 0 otherwise), is_positive
    and valid (B, S) bool (invalid slots: fewer candidates than S).
    """
    batch = proposals.shape[0]
    if proposals.ndim != 3 or proposals.shape[-1] != 4:
        raise ValueError(f'proposals must be (B, P, 4), got shape {tuple(proposals.shape)}')
    if proposal_valid.shape != proposals.shape[:2]:
        raise ValueError(
            f'proposal_valid must be {proposals.shape[:2]} like proposals, got '
            f'{tuple(proposal_valid.shape)}'
        )
    check_ground_truth(batch, gt_boxes, gt_valid, gt_classes)
    num_gts = gt_boxes.shape[1]
    gt_boxes = gt_boxes.astype(jnp.float32)
    candidates = jnp.concatenate(
        [gt_boxes, jax.lax.stop_gradient(proposals).astype(jnp.float32)], axis=1
    )  # (B, G + P, 4)
    candidate_valid = jnp.concatenate([gt_valid, proposal_valid], axis=1)

    def image_targets(boxes, valid, gts, gts_valid, classes, key):
        # A min_pos_iou above any IoU: no low-quality matches.
        matched, state = assign_anchors(
            boxes,
            valid,
            gts,
            gts_valid,
            pos_iou=iou_threshold,
            neg_iou=iou_threshold,
            min_pos_iou=float('inf'),
        )
        # The gts added as proposals are positives of themselves.
        state = state.at[:num_gts].set(jnp.where(gts_valid, POSITIVE, IGNORED))
        matched = matched.at[:num_gts].set(jnp.arange(num_gts, dtype=jnp.int32))
        indices, is_positive, sampled = sample(
            state, key, num=num_samples, pos_fraction=pos_fraction
        )
        rois = boxes[indices]
        positive = is_positive & sampled
        matched_gt = jnp.where(positive, matched[indices], 0)
        targets = jnp.where(positive[:, None], gts[matched_gt], rois)
        return dict(
            indices=indices,
            rois=rois,
            labels=jnp.where(positive, classes[matched_gt], num_classes).astype(jnp.int32),
            box_targets=encode_deltas(rois, targets, box_stds),
            matched_boxes=targets,
            matched_gt=matched_gt,
            is_positive=positive,
            valid=sampled,
        )

    return jax.vmap(image_targets)(
        candidates,
        candidate_valid,
        gt_boxes,
        gt_valid,
        gt_classes,
        jax.random.split(rng, batch),
    )


def rcnn_loss(
    class_logits: jax.Array,
    box_deltas: jax.Array,
    targets: dict[str, jax.Array],
    *,
    box_loss: str = 'l1',
    box_stds: Sequence[float] = RCNN_BOX_STDS,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The box head's loss of a batch, float32.

    class_logits (B, S, K + 1) (background last), box_deltas (B, S, K * 4) (class k's deltas at
    4k..4k+3) of the RoIs of rcnn_targets, whose outputs `targets` are. Returns (cls + bbox,
    dict(rcnn_cls=, rcnn_bbox=)): the softmax cross-entropy of the valid RoIs and the box loss of
    the positives' own-class deltas, both divided by the batch's number of valid RoIs. box_loss
    'l1': L1 against the encoded targets; 'giou': GIOU_LOSS_WEIGHT x (1 - GIoU) of the deltas
    decoded on the RoI (box_stds, unclipped) against the matched gt box (MMDetection's
    reg_decoded_bbox with GIoULoss, as Swin Transformer's cascade heads).
    """
    if box_loss not in BOX_LOSSES:
        raise ValueError(f'box_loss must be one of {BOX_LOSSES}, got {box_loss!r}')
    labels, valid, positive = targets['labels'], targets['valid'], targets['is_positive']
    batch, slots = labels.shape
    num_classes = class_logits.shape[-1] - 1
    if class_logits.shape != (batch, slots, num_classes + 1):
        raise ValueError(
            f'class_logits must be (B={batch}, S={slots}, K + 1), got shape '
            f'{tuple(class_logits.shape)}'
        )
    if box_deltas.shape != (batch, slots, num_classes * 4):
        raise ValueError(
            f'box_deltas must be {(batch, slots, num_classes * 4)} (K={num_classes} from the '
            f'class logits), got shape {tuple(box_deltas.shape)}'
        )
    class_logits = class_logits.astype(jnp.float32)
    log_probs = jax.nn.log_softmax(class_logits, axis=-1)
    cross_entropy = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    avg_factor = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
    cls = jnp.sum(jnp.where(valid, cross_entropy, 0.0)) / avg_factor

    # The deltas of each RoI's own class (background RoIs: class 0, masked out).
    per_class = box_deltas.astype(jnp.float32).reshape(batch, slots, num_classes, 4)
    own_class = jnp.clip(labels, 0, num_classes - 1)[..., None, None]
    own_deltas = jnp.take_along_axis(per_class, own_class, axis=2)[:, :, 0]  # (B, S, 4)
    if box_loss == 'l1':
        l1 = jnp.sum(jnp.abs(own_deltas - targets['box_targets']), axis=-1)
        bbox = jnp.sum(jnp.where(positive, l1, 0.0)) / avg_factor
    else:
        boxes = decode_deltas(targets['rois'].astype(jnp.float32), own_deltas, box_stds)
        giou = aligned_giou(boxes, targets['matched_boxes'])
        bbox = GIOU_LOSS_WEIGHT * jnp.sum(jnp.where(positive, 1 - giou, 0.0)) / avg_factor
    return cls + bbox, dict(rcnn_cls=cls, rcnn_bbox=bbox)


def mask_loss(
    mask_logits: jax.Array, mask_targets: jax.Array, labels: jax.Array, is_positive: jax.Array
) -> jax.Array:
    """The mask head's loss of a batch, float32.

    mask_logits (B, S, M, M, K); mask_targets (B, S, M, M) in {0, 1}: each RoI's gt mask
    cropped and resized to M x M (binarised); labels (B, S) int32 and is_positive (B, S) bool as
    rcnn_targets returns them. Binary cross-entropy of each positive's own-class channel, the
    mean over the positives' pixels (0 without positives).
    """
    batch, slots, size = mask_logits.shape[:3]
    num_classes = mask_logits.shape[-1]
    if mask_logits.shape != (batch, slots, size, size, num_classes):
        raise ValueError(f'mask_logits must be (B, S, M, M, K), got {tuple(mask_logits.shape)}')
    if mask_targets.shape != (batch, slots, size, size):
        raise ValueError(
            f'mask_targets must be {(batch, slots, size, size)} like the mask logits, got '
            f'{tuple(mask_targets.shape)}'
        )
    for name, array in (('labels', labels), ('is_positive', is_positive)):
        if array.shape != (batch, slots):
            raise ValueError(f'{name} must be {(batch, slots)}, got {tuple(array.shape)}')
    own_class = jnp.clip(labels, 0, num_classes - 1)[:, :, None, None, None]
    logits = jnp.take_along_axis(mask_logits.astype(jnp.float32), own_class, axis=-1)[..., 0]
    targets = mask_targets.astype(jnp.float32)
    cross_entropy = -(
        targets * jax.nn.log_sigmoid(logits) + (1 - targets) * jax.nn.log_sigmoid(-logits)
    )
    total = jnp.sum(jnp.where(is_positive[..., None, None], cross_entropy, 0.0))
    num_pixels = jnp.sum(is_positive).astype(jnp.float32) * size * size
    return total / jnp.maximum(num_pixels, 1.0)
