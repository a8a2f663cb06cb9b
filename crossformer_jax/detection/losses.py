"""RetinaNet's training loss: sigmoid focal loss over every class of the positive and negative
anchors plus L1 on the encoded box deltas of the positives, both divided by
sum over images of max(positives, 1) (MMDetection's RetinaHead with a PseudoSampler)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from crossformer_jax.detection.anchors import AnchorGenerator, flatten_levels
from crossformer_jax.detection.assignment import NEGATIVE, POSITIVE, assign_anchors
from crossformer_jax.detection.boxes import encode_deltas


def sigmoid_focal_loss(
    logits: jax.Array, targets: jax.Array, alpha: float = 0.25, gamma: float = 2.0
) -> jax.Array:
    """(..., K) logits and targets in [0, 1] -> (..., K) float32 losses, elementwise:
    -alpha (1 - p)^gamma log p for target 1, -(1 - alpha) p^gamma log(1 - p) for target 0
    (p = sigmoid(logit); in between, the same weights and cross-entropy interpolated linearly).
    The logs are log-sigmoids: finite for any logit."""
    logits = logits.astype(jnp.float32)
    targets = targets.astype(jnp.float32)
    cross_entropy = -(
        targets * jax.nn.log_sigmoid(logits) + (1 - targets) * jax.nn.log_sigmoid(-logits)
    )
    # The probability given to the wrong answer; 1 - p as sigmoid(-logit), exact when p ~ 1.
    p_wrong = jax.nn.sigmoid(-logits) * targets + jax.nn.sigmoid(logits) * (1 - targets)
    weight = (alpha * targets + (1 - alpha) * (1 - targets)) * p_wrong**gamma
    return weight * cross_entropy


def retinanet_loss(
    class_logits: Sequence[jax.Array],
    box_deltas: Sequence[jax.Array],
    anchor_generator: AnchorGenerator,
    gt_boxes: jax.Array,
    gt_classes: jax.Array,
    gt_valid: jax.Array,
    pad_shapes: jax.Array,
    *,
    pos_iou: float = 0.5,
    neg_iou: float = 0.4,
    alpha: float = 0.25,
    gamma: float = 2.0,
    box_stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """RetinaNet's loss of a batch, float32.

    class_logits: per level (B, H_l, W_l, A * K); box_deltas: per level (B, H_l, W_l, A * 4)
    (channel a * K + k and a * 4 + j); gt_boxes (B, G, 4) xyxy in the (resized) image's pixels,
    gt_classes (B, G) int32 in [0, K) (a class >= K counts as background), gt_valid (B, G) bool
    (False: batch padding or a crowd box); pad_shapes (B, 2) int32: each image's (height, width)
    padded to a multiple of 32. Returns (focal + l1, dict(focal=, l1=, num_positives=)), the
    losses divided by sum over images of max(positives, 1); num_positives (float32) counts the
    positive anchors of the batch.
    """
    feature_sizes, num_classes = anchor_generator.output_sizes(class_logits, box_deltas)
    batch = class_logits[0].shape[0]
    if gt_boxes.ndim != 3 or gt_boxes.shape[0] != batch or gt_boxes.shape[-1] != 4:
        raise ValueError(f'gt_boxes must be (B={batch}, G, 4), got shape {tuple(gt_boxes.shape)}')
    gt_shape = gt_boxes.shape[:2]
    for name, array in (('gt_classes', gt_classes), ('gt_valid', gt_valid)):
        if array.shape != gt_shape:
            raise ValueError(f'{name} must be {gt_shape} like gt_boxes, got {tuple(array.shape)}')
    if pad_shapes.shape != (batch, 2):
        raise ValueError(f'pad_shapes must be ({batch}, 2), got shape {tuple(pad_shapes.shape)}')

    anchors = jnp.concatenate(anchor_generator.grid_anchors(feature_sizes))  # (N, 4)
    anchor_valid = jnp.concatenate(anchor_generator.valid_flags(feature_sizes, pad_shapes), 1)
    gt_boxes = gt_boxes.astype(jnp.float32)
    matched, state = jax.vmap(
        lambda valid, boxes, gts_valid: assign_anchors(
            anchors, valid, boxes, gts_valid, pos_iou=pos_iou, neg_iou=neg_iou
        )
    )(anchor_valid, gt_boxes, gt_valid)  # (B, N) each
    positive = state == POSITIVE
    num_positives = jnp.sum(positive, axis=1)
    avg_factor = jnp.sum(jnp.maximum(num_positives, 1)).astype(jnp.float32)

    # Classification, level by level (no concatenated copy of the logits): the matched gt's class
    # for positives, -1 (no class) for the others; the one-hot targets exist only inside the
    # fused elementwise loss.
    labels = jnp.where(positive, jnp.take_along_axis(gt_classes, matched, axis=1), -1)
    counted = (state == POSITIVE) | (state == NEGATIVE)
    focal = jnp.float32(0.0)
    start = 0
    for logits, (h, w) in zip(class_logits, feature_sizes):
        stop = start + h * w * anchor_generator.num_anchors
        targets = labels[:, start:stop, None] == jnp.arange(num_classes)
        losses = sigmoid_focal_loss(logits.reshape(batch, -1, num_classes), targets, alpha, gamma)
        focal += jnp.sum(jnp.where(counted[:, start:stop, None], losses, 0.0))
        start = stop

    # Boxes: positives only; the others encode their own anchor (zero deltas, no log of 0).
    matched_boxes = jnp.take_along_axis(gt_boxes, matched[..., None], axis=1)  # (B, N, 4)
    matched_boxes = jnp.where(positive[..., None], matched_boxes, anchors)
    box_targets = encode_deltas(anchors, matched_boxes, box_stds)
    deltas = flatten_levels(box_deltas, 4).astype(jnp.float32)
    l1 = jnp.sum(jnp.where(positive[..., None], jnp.abs(deltas - box_targets), 0.0))

    focal, l1 = focal / avg_factor, l1 / avg_factor
    stats = dict(focal=focal, l1=l1, num_positives=jnp.sum(num_positives).astype(jnp.float32))
    return focal + l1, stats
