"""Test-time post-processing on the device, with fixed output shapes: `detect` (RetinaNet),
`rcnn_detect` (a two-stage detector's box head) and the class-wise NMS they share,
`multiclass_nms`; `regress_by_class` moves RoIs by their class's deltas (a cascade's stages).

detect() follows MMDetection's RetinaHead.get_bboxes + multiclass_nms:

1. per level, sigmoid scores (H_l * W_l * A, K); the pre_nms_top_k anchors with the highest
   max-over-classes score (all of them when there are fewer); their deltas decoded and the boxes
   clipped to the image (resized, unpadded) shape;
2. over the concatenated levels, every (box, class) pair scoring > score_threshold is a
   candidate; here the max_candidates best of them (one lax.top_k over the (N * K) scores);
3. class-wise greedy NMS: in score order, a kept candidate suppresses the later ones of its
   class with IoU > iou_threshold; the first max_detections keeps are the detections.

When it equals the full algorithm. Greedy NMS decides on a candidate from the higher-ranked
candidates only, so the keeps found among the top max_candidates are exactly the full
algorithm's keeps that rank there, in the same order. The output therefore always is a prefix of
the full algorithm's first max_detections keeps, and is all of them whenever at most
max_candidates pairs score above the threshold, or the top max_candidates already hold
max_detections keeps. Otherwise it is shorter (num_detections < max_detections), missing only
lower-scored detections than those it returns. A max_candidates of at least N * K (N = sum over
levels of min(pre_nms_top_k, H_l * W_l * A)) makes it exact always.

Ranking ties (equal scores) go to the lower index of the (level, y, x, a, class) order, in both
the per-level top-k and the candidate ranking.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from crossformer_jax.detection.anchors import AnchorGenerator
from crossformer_jax.detection.boxes import RCNN_BOX_STDS, decode_deltas, greedy_nms

# A COCO RetinaNet at 800 x 1333 has N = 4693 boxes (1000 per level but the smallest), up to 375k
# (box, class) pairs. Each detection stands for a cluster of near-duplicate pairs that NMS
# removes (neighbouring positions, the 9 anchors, adjacent levels: tens per object), so 100
# detections are expected among the top few thousand pairs above the threshold: 4096 is that
# estimate with a margin (an estimate, not measured on a trained model). Images with at most 4096
# pairs above the threshold get the exact result. Cost per image: one top-k of 4096 over N * K
# scores and at most max_detections steps of 4096 IoUs.
DEFAULT_MAX_CANDIDATES = 4096


def detect(
    class_logits: Sequence[jax.Array],
    box_deltas: Sequence[jax.Array],
    anchor_generator: AnchorGenerator,
    image_shapes: jax.Array,
    *,
    pre_nms_top_k: int = 1000,
    score_threshold: float = 0.05,
    iou_threshold: float = 0.5,
    max_detections: int = 100,
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
    box_stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
) -> dict[str, jax.Array]:
    """Detections of a batch from a RetinaNet head's outputs (see the module docstring).

    class_logits: per level (B, H_l, W_l, A * K); box_deltas: per level (B, H_l, W_l, A * 4);
    image_shapes (B, 2): each image's resized, unpadded (height, width), for clipping. Returns
    boxes (B, D, 4) float32 xyxy in the resized image's pixels, scores (B, D) float32, classes
    (B, D) int32 and num_detections (B,) int32, D = max_detections, best first; the entries past
    num_detections are zero boxes and scores with class -1.
    """
    if not isinstance(pre_nms_top_k, int) or pre_nms_top_k < 1:
        raise ValueError(f'pre_nms_top_k must be a positive integer, got {pre_nms_top_k!r}')
    feature_sizes, num_classes = anchor_generator.output_sizes(class_logits, box_deltas)
    batch = class_logits[0].shape[0]
    image_shapes = jnp.asarray(image_shapes)
    if image_shapes.shape != (batch, 2):
        raise ValueError(
            f'image_shapes must be ({batch}, 2) (height, width), got shape '
            f'{tuple(image_shapes.shape)}'
        )
    max_shape = image_shapes[:, None, :].astype(jnp.float32)

    # 1. Per level: the best anchors by max class score, decoded and clipped.
    all_scores, all_boxes = [], []
    level_anchors = anchor_generator.grid_anchors(feature_sizes)
    for anchors, logits, deltas in zip(level_anchors, class_logits, box_deltas):
        scores = jax.nn.sigmoid(logits.astype(jnp.float32).reshape(batch, -1, num_classes))
        deltas = deltas.astype(jnp.float32).reshape(batch, -1, 4)
        anchors = jnp.asarray(anchors)
        if scores.shape[1] > pre_nms_top_k:
            _, keep = jax.lax.top_k(jnp.max(scores, axis=-1), pre_nms_top_k)  # (B, k)
            scores = jnp.take_along_axis(scores, keep[..., None], axis=1)
            deltas = jnp.take_along_axis(deltas, keep[..., None], axis=1)
            anchors = anchors[keep]
        all_scores.append(scores)
        all_boxes.append(decode_deltas(anchors, deltas, box_stds, max_shape))
    scores = jnp.concatenate(all_scores, axis=1)  # (B, N, K)
    boxes = jnp.concatenate(all_boxes, axis=1)  # (B, N, 4)

    return multiclass_nms(
        scores,
        boxes,
        score_threshold=score_threshold,
        iou_threshold=iou_threshold,
        max_detections=max_detections,
        max_candidates=max_candidates,
    )


def multiclass_nms(
    scores: jax.Array,
    boxes: jax.Array,
    *,
    score_threshold: float = 0.05,
    iou_threshold: float = 0.5,
    max_detections: int = 100,
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
) -> dict[str, jax.Array]:
    """Class-wise NMS of scored boxes (MMDetection's multiclass_nms), with fixed output shapes.

    scores (B, N, K); boxes (B, N, 4) shared by the classes or (B, N, K, 4) one per class. The
    max_candidates best (box, class) pairs scoring > score_threshold go through greedy NMS per
    class (IoU > iou_threshold suppresses), max_detections kept (the module docstring says when
    this equals NMS over every pair). Returns boxes (B, D, 4), scores (B, D), classes (B, D)
    int32 (-1 past the detections) and num_detections (B,) int32, D = max_detections.
    """
    for name, value in (('max_detections', max_detections), ('max_candidates', max_candidates)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f'{name} must be a positive integer, got {value!r}')
    if max_candidates < max_detections:
        raise ValueError(
            f'max_candidates ({max_candidates}) must be at least max_detections ({max_detections})'
        )
    batch, num_boxes, num_classes = scores.shape
    flat_scores = scores.reshape(batch, -1)
    num_candidates = min(max_candidates, flat_scores.shape[1])
    above = jnp.where(flat_scores > score_threshold, flat_scores, -jnp.inf)
    candidate_scores, candidate_index = jax.lax.top_k(above, num_candidates)
    candidate_classes = (candidate_index % num_classes).astype(jnp.int32)
    if boxes.ndim == 3:  # shared by the classes
        box_index = candidate_index // num_classes
    else:
        boxes, box_index = boxes.reshape(batch, num_boxes * num_classes, 4), candidate_index
    candidate_boxes = jnp.take_along_axis(boxes, box_index[..., None], axis=1)  # (B, C, 4)

    # Greedy NMS per class: the first remaining candidate (the best) is kept and removes its
    # class's candidates that overlap it by more than iou_threshold.
    kept_index, kept = greedy_nms(
        candidate_boxes,
        candidate_scores > score_threshold,
        candidate_classes,
        iou_threshold=iou_threshold,
        max_keep=max_detections,
    )
    detected_boxes = jnp.take_along_axis(candidate_boxes, kept_index[..., None], axis=1)
    return dict(
        boxes=jnp.where(kept[..., None], detected_boxes, 0.0),
        scores=jnp.where(kept, jnp.take_along_axis(candidate_scores, kept_index, axis=1), 0.0),
        classes=jnp.where(kept, jnp.take_along_axis(candidate_classes, kept_index, axis=1), -1),
        num_detections=jnp.sum(kept, axis=1, dtype=jnp.int32),
    )


def regress_by_class(
    rois: jax.Array,
    box_deltas: jax.Array,
    labels: jax.Array,
    image_shapes: jax.Array,
    box_stds: Sequence[float] = RCNN_BOX_STDS,
) -> jax.Array:
    """Each RoI moved by its label's deltas (a cascade stage's refinement; MMDetection's
    BBoxHead.regress_by_class): rois (B, R, 4), box_deltas (B, R, 4 K), labels (B, R) int in
    [0, K), image_shapes (B, 2) (height, width) -> (B, R, 4) boxes clipped to the image."""
    batch, num_rois = labels.shape
    if rois.shape != (batch, num_rois, 4) or box_deltas.shape[:2] != (batch, num_rois):
        raise ValueError(
            f'rois and box_deltas must be ({batch}, {num_rois}, 4) and ({batch}, {num_rois}, 4K) '
            f'like labels, got {tuple(rois.shape)} and {tuple(box_deltas.shape)}'
        )
    per_class = box_deltas.astype(jnp.float32).reshape(batch, num_rois, -1, 4)
    own = jnp.take_along_axis(per_class, labels[..., None, None], axis=2)[:, :, 0]
    max_shape = jnp.asarray(image_shapes)[:, None, :].astype(jnp.float32)
    return decode_deltas(rois.astype(jnp.float32), own, box_stds, max_shape)


def rcnn_detect(
    class_logits: jax.Array,
    box_deltas: jax.Array,
    rois: jax.Array,
    roi_valid: jax.Array,
    image_shapes: jax.Array,
    *,
    box_stds: Sequence[float] = RCNN_BOX_STDS,
    score_threshold: float = 0.05,
    iou_threshold: float = 0.5,
    max_detections: int = 100,
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
) -> dict[str, jax.Array]:
    """Detections of a two-stage detector's box head (MMDetection's BBoxHead.get_bboxes):
    softmax over K + 1 classes (the last one background, dropped), each RoI's class-specific
    deltas decoded on it and clipped to the image, then multiclass_nms.

    class_logits (B, R, K + 1), box_deltas (B, R, 4 K), rois (B, R, 4) with roi_valid (B, R)
    bool (invalid RoIs never detect anything), image_shapes (B, 2) (height, width). Returns
    multiclass_nms's dict.
    """
    batch, num_rois, num_outputs = class_logits.shape
    num_classes = num_outputs - 1
    if box_deltas.shape != (batch, num_rois, 4 * num_classes):
        raise ValueError(
            f'box_deltas must be {(batch, num_rois, 4 * num_classes)} for {num_classes} classes, '
            f'got {tuple(box_deltas.shape)}'
        )
    scores = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[..., :num_classes]
    scores = jnp.where(roi_valid[..., None], scores, 0.0)
    deltas = box_deltas.astype(jnp.float32).reshape(batch, num_rois, num_classes, 4)
    max_shape = jnp.asarray(image_shapes)[:, None, None, :].astype(jnp.float32)
    boxes = decode_deltas(rois[:, :, None, :].astype(jnp.float32), deltas, box_stds, max_shape)
    return multiclass_nms(
        scores,
        boxes,
        score_threshold=score_threshold,
        iou_threshold=iou_threshold,
        max_detections=max_detections,
        max_candidates=max_candidates,
    )
