"""Anchor assignment by IoU (MMDetection's MaxIoUAssigner with RetinaNet's settings), per image
with static shapes: padded ground truths carry gt_valid False, anchors over batch padding carry
anchor_valid False."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from crossformer_jax.detection.boxes import box_iou

POSITIVE, NEGATIVE, IGNORED = 1, 0, -1


def assign_anchors(
    anchors: jax.Array,
    anchor_valid: jax.Array,
    gt_boxes: jax.Array,
    gt_valid: jax.Array,
    *,
    pos_iou: float = 0.5,
    neg_iou: float = 0.4,
    min_pos_iou: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Matches the anchors of one image to its ground-truth boxes (vmap for a batch).

    anchors (A, 4), anchor_valid (A,) bool, gt_boxes (G, 4), gt_valid (G,) bool ->
    matched_gt (A,) int32 (the gt index, meaningful where positive; 0 elsewhere) and state (A,)
    int32: POSITIVE 1, NEGATIVE 0, IGNORED -1. Over the valid anchors and valid gts:

    - negative where the anchor's largest IoU with a gt is < neg_iou (every valid anchor when
      there is no valid gt);
    - positive, matched to its best gt (the first among equals), where that IoU is >= pos_iou;
    - then, for each gt i in order whose largest IoU over anchors m_i is >= min_pos_iou, every
      anchor with IoU exactly m_i with gt i becomes positive for gt i (a later gt overrides an
      earlier one).

    Invalid anchors are ignored and take no part in the gts' largest IoUs; invalid gts match
    nothing.
    """
    if anchors.ndim != 2 or anchors.shape[-1] != 4:
        raise ValueError(f'anchors must be (A, 4), got shape {tuple(anchors.shape)}')
    if anchor_valid.shape != anchors.shape[:1]:
        raise ValueError(
            f'anchor_valid must be ({anchors.shape[0]},) like the anchors, got shape '
            f'{tuple(anchor_valid.shape)}'
        )
    if gt_boxes.ndim != 2 or gt_boxes.shape[-1] != 4:
        raise ValueError(f'gt_boxes must be (G, 4), got shape {tuple(gt_boxes.shape)}')
    if gt_valid.shape != gt_boxes.shape[:1]:
        raise ValueError(
            f'gt_valid must be ({gt_boxes.shape[0]},) like gt_boxes, got shape '
            f'{tuple(gt_valid.shape)}'
        )
    num_gts = gt_boxes.shape[0]
    if num_gts == 0:
        state = jnp.where(anchor_valid, NEGATIVE, IGNORED).astype(jnp.int32)
        return jnp.zeros(anchors.shape[:1], jnp.int32), state
    pair_valid = anchor_valid[:, None] & gt_valid[None, :]
    # IoU >= 0 always, so -1 marks the pairs that take no part.
    iou = jnp.where(pair_valid, box_iou(anchors, gt_boxes), -1.0)  # (A, G)

    anchor_max = jnp.max(iou, axis=1)  # -1: no valid gt
    negative = anchor_valid & (anchor_max < neg_iou)
    positive = anchor_valid & (anchor_max >= pos_iou)

    # Low-quality matches: the last gt (in index order) at whose largest IoU the anchor sits.
    gt_max = jnp.max(iou, axis=0, initial=-1.0)  # (G,), -1: invalid gt or no valid anchor
    gt_eligible = gt_valid & (gt_max >= min_pos_iou)
    at_gt_max = (iou == gt_max[None, :]) & gt_eligible[None, :] & anchor_valid[:, None]
    low_quality = jnp.any(at_gt_max, axis=1)
    last_gt = num_gts - 1 - jnp.argmax(at_gt_max[:, ::-1], axis=1)

    state = jnp.where(negative, NEGATIVE, IGNORED)
    state = jnp.where(positive | low_quality, POSITIVE, state).astype(jnp.int32)
    matched = jnp.where(low_quality, last_gt, jnp.where(positive, jnp.argmax(iou, axis=1), 0))
    return matched.astype(jnp.int32), state
