"""Independent PyTorch reference of RoIAlign with mmcv 1.x semantics (``RoIAlign(output_size,
spatial_scale, sampling_ratio, aligned)``) and of MMDetection's SingleRoIExtractor level mapping,
NCHW as in PyTorch. Plain torch: no mmcv, no torchvision.

Exact for any number of samples per bin (the adaptive grid of sampling_ratio=0 included): one RoI
at a time, its bilinear samples as two per-axis interpolation matrices over the rows and columns
the RoI reads, which is exact because the bilinear weights, the out-of-map zero and the clamps
each depend on one axis only. Sample positions and weights are float32, as in mmcv's kernels;
the sums are float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def axis_samples(
    start: torch.Tensor, length: torch.Tensor, size: int, output_size: int, grid: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The output_size * grid bilinear samples of one axis of one RoI (float32 0-d start and
    length in map pixels, bin after bin): (low, high) map indices (output_size * grid,) int64 and
    their weights (output_size * grid, 2) float32, zero for samples outside [-1, size]."""
    bin_size = length / output_size
    bins = torch.arange(output_size, dtype=torch.float32).repeat_interleave(grid)
    steps = torch.arange(grid, dtype=torch.float32).repeat(output_size)
    # mmcv's order of float32 operations: start + p * bin + (i + 0.5) * bin / grid.
    position = start + bins * bin_size + (steps + 0.5) * bin_size / grid
    outside = (position < -1) | (position > size)
    position = position.clamp(min=0)
    low = position.floor()
    at_end = low >= size - 1
    low = torch.where(at_end, torch.full_like(low, size - 1), low)
    position = torch.where(at_end, low, position)
    high = torch.where(at_end, low, low + 1)
    fraction = position - low
    weights = torch.stack([1 - fraction, fraction], dim=1)
    weights[outside] = 0
    return low.long(), high.long(), weights


def axis_matrix(
    low: torch.Tensor, high: torch.Tensor, weights: torch.Tensor, output_size: int, grid: int
) -> tuple[torch.Tensor, int]:
    """Per-bin sums of one axis' samples as a float64 (output_size, span) matrix over the map
    indices first..first + span - 1, and first (grid >= 1)."""
    first = int(low.min())
    span = int(high.max()) - first + 1
    matrix = torch.zeros(output_size * grid, span, dtype=torch.float64)
    rows = torch.arange(output_size * grid)
    matrix.index_put_((rows, low - first), weights[:, 0].double(), accumulate=True)
    matrix.index_put_((rows, high - first), weights[:, 1].double(), accumulate=True)
    return matrix.reshape(output_size, grid, span).sum(1), first


def roi_align_reference(
    features: torch.Tensor,
    rois: torch.Tensor,
    output_size: int,
    spatial_scale: float,
    sampling_ratio: int = 0,
    aligned: bool = True,
) -> torch.Tensor:
    """features (N, C, H, W), rois (K, 5) [batch_index, x1, y1, x2, y2] in image pixels ->
    (K, C, output_size, output_size) float32: mmcv's RoIAlign forward.

    Per RoI: offset 0.5 when aligned; start = x1 * scale - offset, end = x2 * scale - offset,
    length = end - start (at least 1 when not aligned); bin = length / output_size; samples per
    bin grid = sampling_ratio, or ceil(length / output_size) when it is 0; each output is the sum
    of its bin's grid_h * grid_w bilinear samples over max(grid_h * grid_w, 1)."""
    if features.ndim != 4:
        raise ValueError(f'features must be (N, C, H, W), got shape {tuple(features.shape)}')
    if rois.ndim != 2 or rois.shape[1] != 5:
        raise ValueError(f'rois must be (K, 5) [batch_index, x1, y1, x2, y2], got {rois.shape}')
    _, channels, height, width = features.shape
    offset = 0.5 if aligned else 0.0
    scale = torch.tensor(spatial_scale, dtype=torch.float32)
    boxes = rois[:, 1:].float()
    output = torch.zeros(len(rois), channels, output_size, output_size, dtype=torch.float32)
    for index in range(len(rois)):
        start_x, start_y, end_x, end_y = boxes[index] * scale - offset
        length_x, length_y = end_x - start_x, end_y - start_y
        if not aligned:
            length_x, length_y = length_x.clamp(min=1), length_y.clamp(min=1)
        grids = []
        for length in (length_y, length_x):
            adaptive = torch.ceil(length / output_size)
            grids.append(sampling_ratio if sampling_ratio > 0 else max(int(adaptive), 0))
        grid_y, grid_x = grids
        if grid_y == 0 or grid_x == 0:
            continue  # no samples: the output stays 0
        rows, top = axis_matrix(
            *axis_samples(start_y, length_y, height, output_size, grid_y), output_size, grid_y
        )
        cols, left = axis_matrix(
            *axis_samples(start_x, length_x, width, output_size, grid_x), output_size, grid_x
        )
        image = features[int(rois[index, 0])]
        patch = image[:, top : top + rows.shape[1], left : left + cols.shape[1]].double()
        pooled = torch.einsum('ph,chw,qw->cpq', rows, patch, cols)
        output[index] = (pooled / (grid_y * grid_x)).float()
    return output


def roi_levels_reference(rois: torch.Tensor, num_levels: int, finest_scale: float) -> torch.Tensor:
    """rois (K, 5) -> (K,) int64 levels: floor(log2(sqrt(w * h) / finest_scale + 1e-6)) clamped to
    [0, num_levels - 1] (SingleRoIExtractor.map_roi_levels)."""
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()


def multilevel_roi_align_reference(
    features: Sequence[torch.Tensor],
    rois: torch.Tensor,
    output_size: int,
    strides: Sequence[int],
    finest_scale: float,
    sampling_ratio: int = 0,
) -> torch.Tensor:
    """features: maps (N, C, H_l, W_l) of strides `strides` (the first len(strides) are used),
    rois (K, 5) [batch_index, x1, y1, x2, y2] -> (K, C, output_size, output_size): each RoI
    pooled (aligned RoIAlign) from its level's map only (SingleRoIExtractor)."""
    if len(features) < len(strides):
        raise ValueError(f'{len(strides)} strides need as many maps, got {len(features)}')
    levels = roi_levels_reference(rois, len(strides), finest_scale)
    channels = features[0].shape[1]
    output = torch.zeros(len(rois), channels, output_size, output_size, dtype=torch.float32)
    for level, stride in enumerate(strides):
        chosen = levels == level
        if chosen.any():
            output[chosen] = roi_align_reference(
                features[level], rois[chosen], output_size, 1 / stride, sampling_ratio
            )
    return output
