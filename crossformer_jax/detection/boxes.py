"""Boxes: IoU and the DeltaXYWH coding of boxes relative to anchors (MMDetection semantics).

Boxes are xyxy (x1, y1, x2, y2) in pixels; widths and areas have no +1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

# Decoded width and height changes are clamped to at most a factor 1000 / 16 either way.
MAX_LOG_SCALE = abs(math.log(16 / 1000))


# The R-CNN heads' box deltas are encoded with these standard deviations (means 0); a cascade's
# stages halve and third them (its later stages see better-placed RoIs).
RCNN_BOX_STDS = (0.1, 0.1, 0.2, 0.2)
CASCADE_BOX_STDS = (RCNN_BOX_STDS, (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))


def _check_boxes(name: str, boxes: jax.Array) -> None:
    if boxes.ndim < 1 or boxes.shape[-1] != 4:
        raise ValueError(f'{name} must be (..., 4), got shape {tuple(boxes.shape)}')


def box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
    """(..., N, 4), (..., M, 4) xyxy -> (..., N, M) intersection over union (0 where the union
    is 0). Leading dimensions broadcast."""
    _check_boxes('boxes1', boxes1)
    _check_boxes('boxes2', boxes2)
    if boxes1.ndim < 2 or boxes2.ndim < 2:
        raise ValueError(
            f'box_iou takes (..., N, 4) and (..., M, 4), got shapes {tuple(boxes1.shape)} and '
            f'{tuple(boxes2.shape)}'
        )
    # Coordinates as (..., N, 1) and (..., 1, M): no (..., N, M, 4) temporaries.
    x1a, y1a, x2a, y2a = (boxes1[..., :, None, i] for i in range(4))
    x1b, y1b, x2b, y2b = (boxes2[..., None, :, i] for i in range(4))
    area1 = (x2a - x1a) * (y2a - y1a)
    area2 = (x2b - x1b) * (y2b - y1b)
    inter_w = jnp.maximum(jnp.minimum(x2a, x2b) - jnp.maximum(x1a, x1b), 0)
    inter_h = jnp.maximum(jnp.minimum(y2a, y2b) - jnp.maximum(y1a, y1b), 0)
    inter = inter_w * inter_h
    union = area1 + area2 - inter
    positive = union > 0
    return jnp.where(positive, inter / jnp.where(positive, union, 1), 0)


def aligned_giou(boxes1: jax.Array, boxes2: jax.Array, eps: float = 1e-6) -> jax.Array:
    """(..., 4), (..., 4) xyxy (broadcast) -> (...,) generalised IoU of each pair: IoU minus the
    share of the smallest enclosing box outside the union, with the union and the enclosing area
    clamped to at least eps (MMDetection's bbox_overlaps(mode='giou', is_aligned=True))."""
    _check_boxes('boxes1', boxes1)
    _check_boxes('boxes2', boxes2)
    inner = jnp.clip(
        jnp.minimum(boxes1[..., 2:], boxes2[..., 2:])
        - jnp.maximum(boxes1[..., :2], boxes2[..., :2]),
        0,
    )
    overlap = inner[..., 0] * inner[..., 1]
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    union = jnp.maximum(area1 + area2 - overlap, eps)
    outer = jnp.clip(
        jnp.maximum(boxes1[..., 2:], boxes2[..., 2:])
        - jnp.minimum(boxes1[..., :2], boxes2[..., :2]),
        0,
    )
    enclosing = jnp.maximum(outer[..., 0] * outer[..., 1], eps)
    return overlap / union - (enclosing - union) / enclosing


def encode_deltas(
    anchors: jax.Array, targets: jax.Array, stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0)
) -> jax.Array:
    """(..., 4) anchors and target boxes (broadcast) -> (..., 4) deltas (dx, dy, dw, dh) / stds:
    dx = (gx - px) / pw, dy = (gy - py) / ph, dw = log(gw / pw), dh = log(gh / ph) with centres
    and sizes of the anchors (p) and targets (g)."""
    _check_boxes('anchors', anchors)
    _check_boxes('targets', targets)
    px, py = (anchors[..., 0] + anchors[..., 2]) * 0.5, (anchors[..., 1] + anchors[..., 3]) * 0.5
    pw, ph = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
    gx, gy = (targets[..., 0] + targets[..., 2]) * 0.5, (targets[..., 1] + targets[..., 3]) * 0.5
    gw, gh = targets[..., 2] - targets[..., 0], targets[..., 3] - targets[..., 1]
    deltas = jnp.stack(
        [(gx - px) / pw, (gy - py) / ph, jnp.log(gw / pw), jnp.log(gh / ph)], axis=-1
    )
    return deltas / jnp.asarray(stds, deltas.dtype)


def decode_deltas(
    anchors: jax.Array,
    deltas: jax.Array,
    stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    max_shape: jax.Array | None = None,
) -> jax.Array:
    """(..., 4) anchors and deltas (broadcast) -> (..., 4) xyxy boxes, encode_deltas' inverse.

    dw and dh (after * stds) are clamped to +-MAX_LOG_SCALE. max_shape (..., 2) (height, width),
    its leading dimensions broadcasting against the boxes' (e.g. (B, 1, 2) for (B, N, 4) boxes),
    clips x to [0, width] and y to [0, height]; None leaves the boxes unclipped.
    """
    _check_boxes('anchors', anchors)
    _check_boxes('deltas', deltas)
    deltas = deltas * jnp.asarray(stds, deltas.dtype)
    dx, dy = deltas[..., 0], deltas[..., 1]
    dw = jnp.clip(deltas[..., 2], -MAX_LOG_SCALE, MAX_LOG_SCALE)
    dh = jnp.clip(deltas[..., 3], -MAX_LOG_SCALE, MAX_LOG_SCALE)
    px, py = (anchors[..., 0] + anchors[..., 2]) * 0.5, (anchors[..., 1] + anchors[..., 3]) * 0.5
    pw, ph = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
    gx, gy = px + pw * dx, py + ph * dy
    gw, gh = pw * jnp.exp(dw), ph * jnp.exp(dh)
    x1, y1, x2, y2 = gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5
    if max_shape is not None:
        max_shape = jnp.asarray(max_shape)
        if max_shape.ndim < 1 or max_shape.shape[-1] != 2:
            raise ValueError(
                f'max_shape must be (..., 2) (height, width), got shape {tuple(max_shape.shape)}'
            )
        height = max_shape[..., 0].astype(x1.dtype)
        width = max_shape[..., 1].astype(x1.dtype)
        x1, x2 = jnp.clip(x1, 0, width), jnp.clip(x2, 0, width)
        y1, y2 = jnp.clip(y1, 0, height), jnp.clip(y2, 0, height)
    return jnp.stack([x1, y1, x2, y2], axis=-1)


def greedy_nms(
    boxes: jax.Array,
    eligible: jax.Array,
    groups: jax.Array,
    *,
    iou_threshold: float,
    max_keep: int,
) -> tuple[jax.Array, jax.Array]:
    """Greedy NMS of boxes ranked best first, batched, with fixed output shapes.

    boxes (B, N, 4) xyxy, best first; eligible (B, N) bool (the candidates); groups (B, N) int
    (class or level: boxes of different groups never suppress each other). Step by step the first
    remaining candidate is kept and removes itself and the remaining ones of its group that
    overlap it by IoU > iou_threshold, until max_keep are kept or none remains. Returns the kept
    positions (B, max_keep) int32, in keeping order, and whether each slot holds one (B,
    max_keep) bool. The first keeps of greedy NMS depend on higher-ranked boxes only, so these are
    exactly the full algorithm's first max_keep keeps.
    """
    batch, num = eligible.shape
    positions = jnp.arange(num)

    def has_work(carry):
        step, remaining, _, _ = carry
        return (step < max_keep) & jnp.any(remaining)

    def keep_best(carry):
        step, remaining, kept_index, kept = carry
        found = jnp.any(remaining, axis=1)  # (B,)
        best = jnp.argmax(remaining, axis=1)  # (B,)
        best_box = jnp.take_along_axis(boxes, best[:, None, None], axis=1)
        best_group = jnp.take_along_axis(groups, best[:, None], axis=1)
        overlap = box_iou(best_box, boxes)[:, 0]  # (B, N)
        suppressed = (overlap > iou_threshold) & (groups == best_group)
        suppressed |= positions[None, :] == best[:, None]
        kept_index = kept_index.at[:, step].set(best.astype(jnp.int32))
        kept = kept.at[:, step].set(found)
        return step + 1, remaining & ~suppressed, kept_index, kept

    _, _, kept_index, kept = jax.lax.while_loop(
        has_work,
        keep_best,
        (
            jnp.int32(0),
            eligible,
            jnp.zeros((batch, max_keep), jnp.int32),
            jnp.zeros((batch, max_keep), bool),
        ),
    )
    return kept_index, kept
