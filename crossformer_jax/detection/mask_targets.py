"""Mask R-CNN's mask targets from box-cropped ground-truth masks, with static shapes.

MMDetection 2.x takes each positive RoI's target as RoIAlign (aligned, adaptive sampling, output
size x size) of its matched gt's full-resolution bitmap, then >= 0.5. The data path here keeps
only each gt's mask cropped to its box at S x S (crossformer_jax.data.coco.crop_mask), so
`mask_targets` resamples that crop instead: the RoI's size x size bin centres, in image
coordinates, are mapped into the gt box, read bilinearly from the crop (half-pixel centres, edge
values repeated up to the box's border, 0 outside the box) and thresholded at 0.5. This equals
the full-resolution target in the limit of large S; the bin-centre sample also stands for the
bin's average, which matters only along the mask's boundary.

Measured (tests/test_coco_masks.py, `mask_iou_to_full_resolution`): IoU between this target and
the full-resolution RoIAlign target (mmcv semantics, >= 0.5), size 28, gt crops of S = 28 / 56
(the default mask_size) / 112:
    rectangle 60 x 40 px, RoI jittered by ~5 px           0.9985  0.9985  0.9985
    disk radius 50 px, RoI = gt box                       0.9870  0.9615  0.9870
    disk radius 50 px, RoI shifted and shrunk by ~10 px   0.9947  1.0     0.9987
    disk radius 150 px, RoI 1.3x the gt box               0.9574  1.0     1.0
    triangle 120 x 90 px, RoI = gt box                    0.9723  0.9676  0.9577
The worst cases are a RoI equal to its gt box with S = 2 * size: every bin centre then falls
half-way between two crop pixels, so the boundary's bilinear values tie at 0.5 and the >= 0.5
keeps them (about half a target pixel of dilation along the boundary).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def _axis_weights(roi_start, roi_end, gt_start, gt_end, size: int, crop: int) -> jax.Array:
    """(..., size, crop) bilinear weights reading a crop of `crop` pixels spanning [gt_start,
    gt_end] at the centres of `size` bins spanning [roi_start, roi_end] (all (...,)); rows of
    bins outside the gt span are 0."""
    centres = roi_start[..., None] + (jnp.arange(size) + 0.5) * (
        (roi_end - roi_start)[..., None] / size
    )
    extent = jnp.maximum(gt_end - gt_start, 1e-6)[..., None]
    inside = (centres >= gt_start[..., None]) & (centres <= gt_end[..., None])
    # Position in the crop's pixels (pixel k centred at k + 0.5), clamped to the crop.
    position = jnp.clip((centres - gt_start[..., None]) / extent * crop - 0.5, 0, crop - 1)
    lower = jnp.floor(position)
    upper_weight = position - lower
    pixels = jnp.arange(crop)
    weights = jnp.where(pixels == lower[..., None], 1 - upper_weight[..., None], 0.0) + jnp.where(
        pixels == jnp.minimum(lower + 1, crop - 1)[..., None], upper_weight[..., None], 0.0
    )
    return jnp.where(inside[..., None], weights, 0.0)


def mask_targets(
    gt_masks: jax.Array,
    gt_boxes: jax.Array,
    rois: jax.Array,
    matched_gt: jax.Array,
    *,
    size: int = 28,
) -> jax.Array:
    """Mask targets of the RoIs, float32 (B, R, size, size) in {0, 1}.

    gt_masks (B, M, S, S): each gt's 0/1 mask cropped to its box (the batches' 'masks');
    gt_boxes (B, M, 4) xyxy in image pixels; rois (B, R, 4) xyxy in the same pixels;
    matched_gt (B, R) int: the gt index of each RoI (e.g. rcnn_targets' matched_gt; the
    targets of RoIs that are not positives are meaningless and should be masked out).
    See the module docstring for the sampling.
    """
    if gt_masks.ndim != 4 or gt_masks.shape[2] != gt_masks.shape[3]:
        raise ValueError(f'gt_masks must be (B, M, S, S), got shape {tuple(gt_masks.shape)}')
    batch, num_gts, crop = gt_masks.shape[:3]
    if gt_boxes.shape != (batch, num_gts, 4):
        raise ValueError(
            f'gt_boxes must be {(batch, num_gts, 4)} like gt_masks, got {tuple(gt_boxes.shape)}'
        )
    if rois.ndim != 3 or rois.shape[0] != batch or rois.shape[2] != 4:
        raise ValueError(f'rois must be (B={batch}, R, 4), got shape {tuple(rois.shape)}')
    if matched_gt.shape != rois.shape[:2]:
        raise ValueError(
            f'matched_gt must be {rois.shape[:2]} like rois, got {tuple(matched_gt.shape)}'
        )
    if size < 1:
        raise ValueError(f'size must be >= 1, got {size}')
    index = jnp.clip(matched_gt.astype(jnp.int32), 0, num_gts - 1)
    crops = jnp.take_along_axis(
        gt_masks.astype(jnp.float32), index[:, :, None, None], axis=1
    )  # (B, R, S, S)
    boxes = jnp.take_along_axis(gt_boxes.astype(jnp.float32), index[:, :, None], axis=1)
    rois = rois.astype(jnp.float32)
    rows = _axis_weights(rois[..., 1], rois[..., 3], boxes[..., 1], boxes[..., 3], size, crop)
    cols = _axis_weights(rois[..., 0], rois[..., 2], boxes[..., 0], boxes[..., 2], size, crop)
    sampled = jnp.einsum('brpi,brij,brqj->brpq', rows, crops, cols, precision=HIGHEST)
    return (sampled >= 0.5).astype(jnp.float32)
