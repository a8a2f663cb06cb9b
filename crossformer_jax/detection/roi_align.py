"""RoIAlign with mmcv 1.x semantics, as MMDetection 2.x's SingleRoIExtractor uses it (Mask R-CNN,
Cascade Mask R-CNN), in plain JAX with static shapes.

mmcv's RoIAlign of a RoI (x1, y1, x2, y2) on a map (H, W, C) of spatial scale s: offset 0.5
when aligned (else 0); start_x = x1 * s - offset, length_x = (x2 * s - offset) - start_x (at
least 1 when not aligned); bins of length_x / out; grid_x samples per bin along x: the
sampling_ratio, or ceil(length_x / out) when it is 0 (adaptive); sample i of bin p at
start_x + p * bin + (i + 0.5) * bin / grid_x; likewise along y. Each output is the sum of its
bin's grid_y * grid_x bilinear samples over max(grid_y * grid_x, 1). A bilinear sample is 0
outside [-1, H] x [-1, W]; its coordinates are clamped to >= 0 and to the last row / column.

Static shapes. Sampling separates per axis (the weights, the out-of-map zero and the clamps each
depend on one axis), so per RoI and axis the samples reduce to a table of S map indices and an
(out, S) matrix of bilinear weights summed per bin, and

    pooled[p, q] = sum_ij rows[p, i] * cols[q, j] * F[index_y[i], index_x[j]]

is one gather of an (S_y, S_x) patch of C-vectors per RoI and two small matmuls. Two layouts of
an index table:
- window: S consecutive indices from the first sample's lower neighbour. Adaptive samples lie at
  most one pixel apart, so the neighbours of out * grid samples span at most out * grid + 2
  consecutive indices: exact whenever grid <= (S - 2) / out.
- pairs: each sample's two neighbours in slots of their own, exact at any spacing whenever
  2 * out * grid <= S (used with a fixed sampling_ratio, S = 2 * out * sampling_ratio, and for
  capped adaptive axes).

Why a long and a short axis. A RoI on level k < 3 has sqrt(w * h) < 112 * 2^k = 28 strides, so
its short side is under 28 map pixels; on level 3 the short side is at most the image's (800 px:
25 map pixels). Only the long side grows with the aspect ratio (28 * sqrt(aspect) map pixels at
the top of a level) or, on level 3, up to the image's long side (1333 px: 42). So each RoI's
longer axis (y when its length is larger, else x) gets S_long = out * max_samples + 2 slots and
the other S_short = out * ceil(max_samples / 2) + 2 rounded up to a multiple of 8 (each at least
2 * out). The default max_samples, ceil(EXACT_EXTENT / out) (8 at 7 x 7, 4 at 14 x 14), pools
exactly every RoI whose long side spans at most 56 map pixels and short side at most 28 (on
levels 0 to 2 every RoI of aspect ratio up to 4, on level 3 every RoI inside an image of up to
1792 x 896), with a 58 x 32
patch at both output sizes; a square window with the same cover would read 58 x 58.

Capped axes. An axis whose adaptive grid exceeds its cap is sampled in the pairs layout with
S // (2 * out) samples per bin (long 4, short 2 at 7 x 7; 2 and 1 at 14 x 14): the result equals
mmcv's with that axis' grid forced to that count, an average of fewer bilinear samples over the
same bins. Both are weighted means of the map values the bin reads (0 included when it reaches
outside the map), so they differ by at most the range of those values. Measured with
`python tests/test_roi_align.py`: 20000 RoIs of an 800 x 1344 image, sqrt(area) log-uniform in
[8, 900] px, log aspect ratio normal with sigma 0.7 (wider than the RPN anchors' 0.5 to 2),
levels as SingleRoIExtractor maps them, 0.35% of them capped at both output sizes; the largest
difference from mmcv's exact result, on maps of standard deviation 1:
                      uncapped RoIs   capped RoIs (max; mean of their max)
    white noise 7x7       4.1e-5          1.10 (0.55)
    white noise 14x14     1.4e-4          1.75 (1.09)
    smooth 7x7            2.1e-5          0.062 (0.034)
    smooth 14x14          4.0e-5          0.150 (0.083)
(smooth: white noise blurred by a Gaussian of 2 pixels). The uncapped differences are float32
rounding: XLA may fuse the multiply-add of a sample position (as nvcc does in mmcv's CUDA
kernel), an ulp of ~3e-5 pixels at x = 280.

Cost, for 2 images x 512 RoIs x 256 channels in float32 at the defaults: the gather reads
1024 x 58 x 32 C-vectors (1.9 GB), in chunks of at most PATCH_BYTES, and the matmuls take
2 * 256 * out * 32 * (58 + out) FLOPs per RoI (7.6 GFLOP in all at 7 x 7, 17 GFLOP at 14 x 14);
the weights are small ((R, out, S) per axis). Compiled for a TPU v5e (AOT, libtpu), the
temporaries take 0.87 GiB at 7 x 7 and 0.90 GiB at 14 x 14 for the forward pass, 0.97 and 1.52
GiB with the backward pass (2.25 / 2.66 and 4.25 / 5.46 GiB unchunked). The other static forms
cost more for the same exact cover: the 2 x 2 neighbours of every sample read
4 * (out * grid_long) * (out * grid_short) vectors (6272 per RoI at 7 x 7, 3.4x the window);
dense per-axis interpolation matrices over a whole map cost 2 * R * out * H * W * C FLOPs
(2.5e11 per image at 14 x 14 on a 200 x 336 map, on every level). The multilevel version gathers
from one table of every image's levels (sum over images and levels of H_l * W_l rows of C), so
each RoI is pooled from its own level only, not from every level and then selected.

Gradients flow to the features (the gather's transpose scatter-adds into the maps); the RoIs
are constants (mmcv's RoIAlign has no gradient for them either). Coordinates are clipped to
+-COORDINATE_LIMIT pixels and NaNs read as 0, so padded RoIs of any value give finite outputs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

# The default max_samples pools exactly every RoI whose long side spans at most this many map
# pixels (and its short side half of it): see the module docstring.
EXACT_EXTENT = 56
# RoI coordinates (image pixels) are clipped to +-this: padded RoIs stay finite.
COORDINATE_LIMIT = 1e6
HIGHEST = jax.lax.Precision.HIGHEST
# The short axis' slots are the gathered patch's second-minor dimension (R, S_long, S_short, C),
# which TPUs tile by 8: a multiple of 8 keeps the gather's output a plain reshape of its rows
# (30 slots made XLA copy the whole patch into the padded layout).
SHORT_SLOT_MULTIPLE = 8
# RoIs are pooled in chunks whose gathered patches take at most this many bytes (at least one
# RoI per chunk): 2 x 512 RoIs x 256 channels in float32 (1.9 GB of patches) go in 8 chunks.
PATCH_BYTES = 256 * 2**20


@dataclasses.dataclass(frozen=True)
class AxisPlan:
    """The static sampling of one RoI axis: `slots` map indices gathered; adaptive grids up to
    `max_grid` are exact (window layout; 0 with a fixed sampling ratio); larger ones, and fixed
    sampling ratios, take `pair_grid` samples per bin (pairs layout)."""

    slots: int
    max_grid: int
    pair_grid: int


def sampling_plan(
    output_size: int, sampling_ratio: int = 0, max_samples: int | None = None
) -> tuple[AxisPlan, AxisPlan]:
    """The plans of a RoI's long and short axes (see the module docstring): a fixed
    sampling_ratio n gives both 2 * output_size * n slots in pairs; adaptive sampling gives the
    long axis max_samples (default ceil(EXACT_EXTENT / output_size)) and the short one
    ceil(max_samples / 2), with output_size * grid + 2 slots (at least 2 * output_size). The
    short axis' slots are rounded up to a multiple of SHORT_SLOT_MULTIPLE."""
    if not isinstance(output_size, int) or output_size < 1:
        raise ValueError(f'output_size must be a positive int, got {output_size!r}')
    if not isinstance(sampling_ratio, int) or sampling_ratio < 0:
        raise ValueError(f'sampling_ratio must be an int >= 0, got {sampling_ratio!r}')
    if max_samples is None:
        max_samples = math.ceil(EXACT_EXTENT / output_size)
    if not isinstance(max_samples, int) or max_samples < 1:
        raise ValueError(f'max_samples must be a positive int or None, got {max_samples!r}')
    if sampling_ratio > 0:
        slots = 2 * output_size * sampling_ratio
        return AxisPlan(slots, 0, sampling_ratio), AxisPlan(_round_slots(slots), 0, sampling_ratio)
    long_slots = max(output_size * max_samples + 2, 2 * output_size)
    short_grid = -(-max_samples // 2)
    short_slots = _round_slots(max(output_size * short_grid + 2, 2 * output_size))
    return (
        AxisPlan(long_slots, max_samples, long_slots // (2 * output_size)),
        AxisPlan(short_slots, short_grid, short_slots // (2 * output_size)),
    )


def _round_slots(slots: int) -> int:
    """slots rounded up to a multiple of SHORT_SLOT_MULTIPLE."""
    return -(-slots // SHORT_SLOT_MULTIPLE) * SHORT_SLOT_MULTIPLE


def _axis_tables(
    start: jax.Array,
    length: jax.Array,
    size: jax.Array,
    output_size: int,
    plan: AxisPlan,
    sampling_ratio: int,
) -> tuple[jax.Array, jax.Array]:
    """One axis of R RoIs: start, length (R,) float32 in map pixels, size (R,) int32 (the map's
    extent along the axis) -> map indices (R, S) int32 in [0, size) and weights (R, out, S)
    float32, each bin's bilinear weights over its sample count."""
    # A true division by output_size, as in mmcv's kernels: XLA would multiply by the constant's
    # rounded reciprocal, and ceil(42 * fl(1 / 7)) is 7, not 6 (lengths that are exact multiples
    # of output_size are common: integer boxes on the map grid).
    divisor = jax.lax.optimization_barrier(jnp.float32(output_size))
    if sampling_ratio > 0:
        grid = jnp.full(start.shape, sampling_ratio, jnp.int32)
        window = jnp.zeros(start.shape, bool)
        samples = sampling_ratio
    else:
        adaptive = jnp.ceil(length / divisor)
        window = adaptive <= plan.max_grid
        grid = jnp.where(window, jnp.maximum(adaptive, 0), plan.pair_grid).astype(jnp.int32)
        samples = max(plan.max_grid, plan.pair_grid)
    bins = (length / divisor)[:, None, None]
    count = jnp.maximum(grid, 1).astype(jnp.float32)[:, None, None]
    bin_index = jnp.arange(output_size, dtype=jnp.float32)[:, None]
    step = jnp.arange(samples, dtype=jnp.float32)
    # (R, out, samples) positions, in mmcv's order of float32 operations (XLA may fuse a
    # multiply-add, as nvcc does in mmcv's CUDA kernel: a difference of an ulp, ~3e-5 pixels at
    # x = 280).
    position = start[:, None, None] + bin_index * bins + (step + 0.5) * bins / count
    extent = size.astype(jnp.float32)[:, None, None]
    used = (step < grid[:, None, None]) & (position >= -1) & (position <= extent)
    position = jnp.maximum(position, 0.0)
    low = jnp.floor(position)
    at_end = low >= extent - 1
    low = jnp.where(at_end, extent - 1, low)
    fraction = jnp.where(at_end, 0.0, position - low)
    share = jnp.where(used, 1.0 / count, 0.0)
    low = low.astype(jnp.int32)

    # Window layout: consecutive indices from the first sample's lower neighbour (positions grow
    # along (bin, step), and the clamps keep that order).
    first = low[:, 0, 0]
    window_index = jnp.minimum(first[:, None] + jnp.arange(plan.slots), size[:, None] - 1)
    # Pairs layout: sample j of the first pair_grid per bin at slots 2j (low), 2j + 1 (high).
    high = jnp.minimum(low + 1, size[:, None, None] - 1)
    pairs = jnp.stack([low, high], axis=-1)[:, :, : plan.pair_grid].reshape(len(start), -1)
    pair_index = jnp.pad(pairs, ((0, 0), (0, plan.slots - pairs.shape[1])))
    pair_slot = 2 * (jnp.arange(output_size)[:, None] * plan.pair_grid + jnp.arange(samples))
    slot = jnp.where(window[:, None, None], low - first[:, None, None], pair_slot)
    index = jnp.where(window[:, None], window_index, pair_index)

    # The low neighbour sits at `slot`, the high one at slot + 1, in both layouts.
    targets = jnp.arange(plan.slots)
    weights = ((1 - fraction) * share)[..., None] * (slot[..., None] == targets) + (
        fraction * share
    )[..., None] * (slot[..., None] + 1 == targets)
    return index, jnp.sum(weights, axis=2)


def _pool_rois(
    table: jax.Array,
    rois: jax.Array,
    heights: jax.Array,
    widths: jax.Array,
    offsets: jax.Array,
    scales: jax.Array,
    *,
    output_size: int,
    sampling_ratio: int,
    aligned: bool,
    max_samples: int | None,
) -> jax.Array:
    """RoIAlign of R RoIs from maps stored row-major in one table (T, C): RoI r reads the
    (heights[r], widths[r]) map starting at row offsets[r] with spatial scale scales[r] (all
    (R,)); rois (R, 4) xyxy image pixels -> (R, out, out, C) in the table's dtype."""
    long_plan, short_plan = sampling_plan(output_size, sampling_ratio, max_samples)
    rois = jnp.clip(jnp.nan_to_num(rois, nan=0.0), -COORDINATE_LIMIT, COORDINATE_LIMIT)
    rois = jax.lax.stop_gradient(rois.astype(jnp.float32))
    corners = rois * scales.astype(jnp.float32)[:, None] - (0.5 if aligned else 0.0)
    start_x, start_y, end_x, end_y = (corners[:, i] for i in range(4))
    length_x, length_y = end_x - start_x, end_y - start_y
    if not aligned:
        length_x, length_y = jnp.maximum(length_x, 1.0), jnp.maximum(length_y, 1.0)
    tall = length_y > length_x
    index_long, weights_long = _axis_tables(
        jnp.where(tall, start_y, start_x),
        jnp.where(tall, length_y, length_x),
        jnp.where(tall, heights, widths),
        output_size,
        long_plan,
        sampling_ratio,
    )
    index_short, weights_short = _axis_tables(
        jnp.where(tall, start_x, start_y),
        jnp.where(tall, length_x, length_y),
        jnp.where(tall, widths, heights),
        output_size,
        short_plan,
        sampling_ratio,
    )
    # (R, S_long, S_short) map rows and columns of each patch.
    is_tall = tall[:, None, None]
    rows = jnp.where(is_tall, index_long[:, :, None], index_short[:, None, :])
    cols = jnp.where(is_tall, index_short[:, None, :], index_long[:, :, None])
    flat_index = offsets[:, None, None] + rows * widths[:, None, None] + cols

    def pool_roi(flat_index, weights_long, weights_short, tall):
        """One RoI: (S_long, S_short) indices into the table, (out, S) weights per axis."""
        patch = jnp.take(table, flat_index, axis=0, mode='clip')
        along_long = jnp.einsum(
            'pi,ijc->pjc',
            weights_long,
            patch,
            precision=HIGHEST,
            preferred_element_type=jnp.float32,
        )
        # pooled[p, q]: bin p along the RoI's long axis, q along its short one.
        pooled = jnp.einsum(
            'qj,pjc->pqc',
            weights_short,
            along_long,
            precision=HIGHEST,
            preferred_element_type=jnp.float32,
        )
        return jnp.where(tall, pooled, jnp.swapaxes(pooled, 0, 1)).astype(table.dtype)

    # At most PATCH_BYTES of patches at a time: beyond, chunks of RoIs one after the other.
    patch_bytes = long_plan.slots * short_plan.slots * table.shape[1] * table.dtype.itemsize
    chunk = max(PATCH_BYTES // patch_bytes, 1)
    per_roi = (flat_index, weights_long, weights_short, tall)
    if len(rois) <= chunk:
        return jax.vmap(pool_roi)(*per_roi)
    return jax.lax.map(lambda args: pool_roi(*args), per_roi, batch_size=chunk)


def _check_rois(rois: jax.Array, shape: str, ndim: int) -> None:
    if rois.ndim != ndim or rois.shape[-1] != 4:
        raise ValueError(f'rois must be {shape} (x1, y1, x2, y2), got shape {tuple(rois.shape)}')


def roi_align(
    features: jax.Array,
    rois: jax.Array,
    *,
    output_size: int,
    spatial_scale: float,
    sampling_ratio: int = 0,
    aligned: bool = True,
    max_samples: int | None = None,
) -> jax.Array:
    """mmcv's RoIAlign on one map: features (H, W, C), rois (R, 4) xyxy in image pixels ->
    (R, output_size, output_size, C) in the features' dtype (float32 sums). Exact while each
    RoI's adaptive grid is within max_samples on its long axis and ceil(max_samples / 2) on its
    short one (default max_samples: ceil(EXACT_EXTENT / output_size)); beyond, see the module
    docstring."""
    if features.ndim != 3:
        raise ValueError(f'features must be (H, W, C), got shape {tuple(features.shape)}')
    _check_rois(rois, '(R, 4)', 2)
    if not spatial_scale > 0:
        raise ValueError(f'spatial_scale must be > 0, got {spatial_scale!r}')
    height, width, channels = features.shape
    count = rois.shape[0]
    return _pool_rois(
        features.reshape(height * width, channels),
        rois,
        jnp.full((count,), height, jnp.int32),
        jnp.full((count,), width, jnp.int32),
        jnp.zeros((count,), jnp.int32),
        jnp.full((count,), spatial_scale, jnp.float32),
        output_size=output_size,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
        max_samples=max_samples,
    )


def roi_levels(rois: jax.Array, num_levels: int = 4, finest_scale: float = 56.0) -> jax.Array:
    """(..., 4) xyxy RoIs -> (...,) int32 levels: floor(log2(sqrt(w * h) / finest_scale + 1e-6))
    clamped to [0, num_levels - 1] (SingleRoIExtractor.map_roi_levels); a RoI of negative or
    NaN area goes to level 0."""
    if rois.ndim < 1 or rois.shape[-1] != 4:
        raise ValueError(f'rois must be (..., 4) (x1, y1, x2, y2), got shape {tuple(rois.shape)}')
    rois = rois.astype(jnp.float32)
    area = (rois[..., 2] - rois[..., 0]) * (rois[..., 3] - rois[..., 1])
    scale = jnp.sqrt(jnp.where(area > 0, area, 0.0))
    levels = jnp.floor(jnp.log2(scale / finest_scale + 1e-6))
    return jnp.clip(levels, 0, num_levels - 1).astype(jnp.int32)


def multilevel_roi_align(
    features: Sequence[jax.Array],
    rois: jax.Array,
    *,
    output_size: int,
    strides: Sequence[int] = (4, 8, 16, 32),
    finest_scale: float = 56.0,
    sampling_ratio: int = 0,
    aligned: bool = True,
    max_samples: int | None = None,
) -> jax.Array:
    """SingleRoIExtractor: features, maps (B, H_l, W_l, C) of strides `strides` (the first
    len(strides) are used: FPN's 5th level serves the RPN only), rois (B, R, 4) xyxy image
    pixels -> (B, R, output_size, output_size, C), each RoI pooled by roi_align from its level
    (roi_levels) with spatial scale 1 / stride."""
    if len(features) < len(strides):
        raise ValueError(
            f'features must hold a map per stride ({len(strides)}), got {len(features)} maps'
        )
    _check_rois(rois, '(B, R, 4)', 3)
    maps = list(features[: len(strides)])
    batch, channels = rois.shape[0], maps[0].shape[-1]
    for level, level_map in enumerate(maps):
        if level_map.ndim != 4 or level_map.shape[0] != batch or level_map.shape[3] != channels:
            raise ValueError(
                f'features[{level}] must be (B={batch}, H, W, C={channels}), got shape '
                f'{tuple(level_map.shape)}'
            )
    # One table of every image's maps, image after image, each map row-major.
    table = jnp.concatenate([m.reshape(batch, -1, channels) for m in maps], axis=1)
    image_rows = table.shape[1]
    sizes = [m.shape[1:3] for m in maps]
    starts = [0]
    for height, width in sizes[:-1]:
        starts.append(starts[-1] + height * width)
    levels = roi_levels(rois, len(strides), finest_scale).reshape(-1)
    image_start = jnp.repeat(jnp.arange(batch, dtype=jnp.int32) * image_rows, rois.shape[1])
    pooled = _pool_rois(
        table.reshape(-1, channels),
        rois.reshape(-1, 4),
        jnp.asarray([h for h, _ in sizes], jnp.int32)[levels],
        jnp.asarray([w for _, w in sizes], jnp.int32)[levels],
        jnp.asarray(starts, jnp.int32)[levels] + image_start,
        jnp.asarray([1 / s for s in strides], jnp.float32)[levels],
        output_size=output_size,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
        max_samples=max_samples,
    )
    return pooled.reshape(*rois.shape[:2], output_size, output_size, channels)
