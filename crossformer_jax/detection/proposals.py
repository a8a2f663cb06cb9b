"""Region proposals from an RPN's outputs (MMDetection 2.x RPNHead._get_bboxes), on the device
with fixed output shapes.

Per image: for each level, the pre_nms_top_k anchors with the highest sigmoid objectness (all of
them when there are fewer), their deltas decoded and the boxes clipped to the image (resized,
unpadded) shape; boxes of width or height <= min_size are dropped; then greedy NMS over all
levels together with the level as the NMS class (boxes of different levels never suppress each
other; a kept box suppresses the lower-scored boxes of its level with IoU > iou_threshold); the
max_proposals best survivors, best first, are the proposals. The greedy loop stops after
max_proposals keeps: the first keeps of greedy NMS depend on higher-ranked boxes only, so this
is exactly the full algorithm's first max_proposals survivors. Equal scores rank the lower
(level, y, x, a) index first.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from crossformer_jax.detection.anchors import AnchorGenerator
from crossformer_jax.detection.boxes import decode_deltas, greedy_nms


def generate_proposals(
    objectness: Sequence[jax.Array],
    deltas: Sequence[jax.Array],
    anchor_generator: AnchorGenerator,
    image_shapes: jax.Array,
    *,
    pre_nms_top_k: int = 1000,
    iou_threshold: float = 0.7,
    max_proposals: int = 1000,
    min_size: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Proposals of a batch (see the module docstring).

    objectness: per level (B, H_l, W_l, A) logits; deltas: per level (B, H_l, W_l, A * 4)
    (channel a * 4 + j); image_shapes (B, 2): each image's resized, unpadded (height, width).
    Returns boxes (B, P, 4) float32 xyxy, scores (B, P) float32 (sigmoid objectness) and valid
    (B, P) bool, P = max_proposals, best first; the entries past the valid ones are zero.
    """
    for name, value in (('pre_nms_top_k', pre_nms_top_k), ('max_proposals', max_proposals)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f'{name} must be a positive integer, got {value!r}')
    feature_sizes, num_classes = anchor_generator.output_sizes(objectness, deltas)
    if num_classes != 1:
        raise ValueError(
            f'objectness must have {anchor_generator.num_anchors} channels (one logit per '
            f'anchor), got {objectness[0].shape[-1]}'
        )
    batch = objectness[0].shape[0]
    image_shapes = jnp.asarray(image_shapes)
    if image_shapes.shape != (batch, 2):
        raise ValueError(
            f'image_shapes must be ({batch}, 2) (height, width), got shape '
            f'{tuple(image_shapes.shape)}'
        )
    max_shape = image_shapes[:, None, :].astype(jnp.float32)

    # 1. Per level: the best anchors by objectness, decoded and clipped.
    all_scores, all_boxes, all_levels = [], [], []
    level_anchors = anchor_generator.grid_anchors(feature_sizes)
    for level, (anchors, logits, level_deltas) in enumerate(zip(level_anchors, objectness, deltas)):
        scores = jax.nn.sigmoid(logits.astype(jnp.float32).reshape(batch, -1))
        level_deltas = level_deltas.astype(jnp.float32).reshape(batch, -1, 4)
        anchors = jnp.asarray(anchors)
        if scores.shape[1] > pre_nms_top_k:
            scores, keep = jax.lax.top_k(scores, pre_nms_top_k)  # (B, k)
            level_deltas = jnp.take_along_axis(level_deltas, keep[..., None], axis=1)
            anchors = anchors[keep]
        all_scores.append(scores)
        all_boxes.append(decode_deltas(anchors, level_deltas, max_shape=max_shape))
        all_levels.append(jnp.full(scores.shape[1], level, jnp.int32))
    scores = jnp.concatenate(all_scores, axis=1)  # (B, N)
    boxes = jnp.concatenate(all_boxes, axis=1)  # (B, N, 4)
    levels = jnp.concatenate(all_levels)  # (N,)

    # 2. Boxes too small are dropped; the rest ranked by score, best first.
    widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    large = (widths > min_size) & (heights > min_size)
    ranked_scores, order = jax.lax.top_k(jnp.where(large, scores, -jnp.inf), scores.shape[1])
    ranked_boxes = jnp.take_along_axis(boxes, order[..., None], axis=1)
    ranked_levels = levels[order]  # (B, N)

    # 3. Greedy NMS per level: the first remaining box (the best) is kept and removes its level's
    # boxes that overlap it by more than iou_threshold.
    kept_index, kept = greedy_nms(
        ranked_boxes,
        jnp.isfinite(ranked_scores),
        ranked_levels,
        iou_threshold=iou_threshold,
        max_keep=max_proposals,
    )
    proposal_boxes = jnp.take_along_axis(ranked_boxes, kept_index[..., None], axis=1)
    proposal_scores = jnp.take_along_axis(ranked_scores, kept_index, axis=1)
    return (
        jnp.where(kept[..., None], proposal_boxes, 0.0),
        jnp.where(kept, proposal_scores, 0.0),
        kept,
    )
