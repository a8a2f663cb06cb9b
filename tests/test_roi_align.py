"""Tests of RoIAlign (crossformer_jax.detection.roi_align) and of its PyTorch reference
(crossformer_jax.reference.roi_align): the reference against mmcv's formulas written out sample
by sample, the JAX functions against the reference (single map, multilevel, fixed sampling
ratio, the cap), under jit and vmap, and their gradients against the reference's autograd.

`python tests/test_roi_align.py` prints the measurement the module docstring quotes: the cap's
effect on realistic RoIs of an 800 x 1344 image."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from crossformer_jax.detection import roi_align as roi_align_lib
from crossformer_jax.detection.roi_align import (
    multilevel_roi_align,
    roi_align,
    roi_levels,
    sampling_plan,
)
from crossformer_jax.reference.roi_align import (
    multilevel_roi_align_reference,
    roi_align_reference,
    roi_levels_reference,
)

F32 = np.float32

# -------------------------------------------------------------------------------------------------
# mmcv's formulas, one sample at a time.


def loop_bilinear(features, y, x):
    """mmcv's bilinear_interpolate of a (C, H, W) map at float32 (y, x) -> (C,) float64."""
    _, height, width = features.shape
    if y < -1 or y > height or x < -1 or x > width:
        return np.zeros(features.shape[0])
    y, x = max(y, F32(0)), max(x, F32(0))
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = F32(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = F32(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - F32(y_low), x - F32(x_low)
    hy, hx = F32(1) - ly, F32(1) - lx
    values = features.astype(np.float64)
    return (
        hy * hx * values[:, y_low, x_low]
        + hy * lx * values[:, y_low, x_high]
        + ly * hx * values[:, y_high, x_low]
        + ly * lx * values[:, y_high, x_high]
    )


def loop_roi_align(
    features, roi, output_size, spatial_scale, sampling_ratio=0, aligned=True, grids=None
):
    """mmcv's RoIAlign of one RoI (x1, y1, x2, y2) on a (C, H, W) map, float32 coordinates as in
    its kernel -> (C, out, out) float64. grids = (grid_y, grid_x) overrides the samples per bin."""
    offset = F32(0.5 if aligned else 0.0)
    scale = F32(spatial_scale)
    x1, y1, x2, y2 = (F32(v) for v in roi)
    start_x, start_y = x1 * scale - offset, y1 * scale - offset
    length_x, length_y = (x2 * scale - offset) - start_x, (y2 * scale - offset) - start_y
    if not aligned:
        length_x, length_y = max(length_x, F32(1)), max(length_y, F32(1))
    bin_x, bin_y = length_x / F32(output_size), length_y / F32(output_size)
    if grids is None:
        grids = [
            sampling_ratio if sampling_ratio > 0 else int(np.ceil(length / F32(output_size)))
            for length in (length_y, length_x)
        ]
    grid_y, grid_x = grids
    pooled = np.zeros((features.shape[0], output_size, output_size))
    for p in range(output_size):
        for q in range(output_size):
            for iy in range(grid_y):
                y = start_y + F32(p) * bin_y + F32(iy + 0.5) * bin_y / F32(grid_y)
                for ix in range(grid_x):
                    x = start_x + F32(q) * bin_x + F32(ix + 0.5) * bin_x / F32(grid_x)
                    pooled[:, p, q] += loop_bilinear(features, y, x)
    return pooled / max(grid_y * grid_x, 1)


# -------------------------------------------------------------------------------------------------
# Helpers.


def reference(features_hwc, rois, output_size, spatial_scale, sampling_ratio=0, aligned=True):
    """roi_align_reference on one (H, W, C) NumPy map -> (R, out, out, C) NumPy."""
    features = torch.tensor(np.asarray(features_hwc).transpose(2, 0, 1))[None]
    rois = np.asarray(rois, np.float32)
    indexed = torch.tensor(np.concatenate([np.zeros((len(rois), 1), np.float32), rois], axis=1))
    pooled = roi_align_reference(
        features, indexed, output_size, spatial_scale, sampling_ratio, aligned
    )
    return pooled.numpy().transpose(0, 2, 3, 1)


def assert_close(actual, expected, scale):
    """float32 agreement: 1e-5 relative, and 1e-5 of the map's magnitude absolute."""
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def adaptive_grids(rois, output_size, spatial_scale):
    """(R, 2) mmcv adaptive grids (along y, along x) of aligned RoIs, float32 as in the kernel."""
    corners = np.asarray(rois, F32) * F32(spatial_scale) - F32(0.5)
    lengths = np.stack([corners[:, 3] - corners[:, 1], corners[:, 2] - corners[:, 0]], axis=1)
    return np.maximum(np.ceil(lengths / F32(output_size)), 0).astype(int)


def random_rois(rng, count, image_height, image_width, sizes, aspect_sigma, inside=True):
    """count xyxy RoIs: sqrt(area) log-uniform in `sizes` (pixels), log aspect normal with
    aspect_sigma, centres uniform over the image; clipped to it when `inside`."""
    side = np.exp(rng.uniform(np.log(sizes[0]), np.log(sizes[1]), count))
    aspect = np.exp(rng.normal(0.0, aspect_sigma, count))
    width, height = side * np.sqrt(aspect), side / np.sqrt(aspect)
    cx, cy = rng.uniform(0, image_width, count), rng.uniform(0, image_height, count)
    rois = np.stack([cx - width / 2, cy - height / 2, cx + width / 2, cy + height / 2], axis=1)
    if inside:
        rois = np.clip(rois, 0, [image_width, image_height, image_width, image_height])
    return rois.astype(np.float32)


# -------------------------------------------------------------------------------------------------
# The reference against the formulas.

TINY_ROIS = [
    (0.6, 1.2, 4.3, 3.9),  # inside
    (-3.0, -2.0, 2.0, 1.5),  # partly outside, top left
    (3.0, 2.0, 9.0, 8.0),  # partly outside, bottom right: reaches the last row and column
    (-9.0, -9.0, -3.0, -4.0),  # entirely outside, before -1
    (8.0, 1.0, 12.0, 3.0),  # entirely outside, right of the map
    (2.0, 2.0, 2.0, 2.0),  # a point
    (1.0, 1.0, 1.0, 4.0),  # zero width
    (4.0, 3.0, 2.0, 1.0),  # negative size
    (5.5, 4.5, 6.0, 5.0),  # on the last row and column
    (0.0, 0.0, 6.0, 5.0),  # the whole map
    (0.2, 2.2, 5.9, 2.4),  # long and thin
]


@pytest.mark.parametrize('aligned', [True, False])
@pytest.mark.parametrize('sampling_ratio', [0, 2])
@pytest.mark.parametrize('spatial_scale', [1.0, 0.5])
def test_reference_matches_the_formulas(aligned, sampling_ratio, spatial_scale):
    rng = np.random.default_rng(0)
    features = rng.standard_normal((2, 5, 6)).astype(np.float32)
    rois = np.asarray(TINY_ROIS, np.float32) / spatial_scale
    pooled = reference(features.transpose(1, 2, 0), rois, 3, spatial_scale, sampling_ratio, aligned)
    for index, roi in enumerate(rois):
        expected = loop_roi_align(features, roi, 3, spatial_scale, sampling_ratio, aligned)
        np.testing.assert_allclose(
            pooled[index].transpose(2, 0, 1), expected, rtol=1e-6, atol=1e-6, err_msg=str(roi)
        )
    if aligned and sampling_ratio == 0:
        # The cases do what they say: outside, empty and negative RoIs pool zeros (the adaptive
        # grid of a side of length <= 0 is 0), the others do not.
        zero = np.abs(pooled).reshape(len(rois), -1).max(axis=1) == 0
        assert zero.tolist() == [False] * 3 + [True] * 5 + [False] * 3


def test_reference_multilevel_and_levels():
    rois = torch.tensor(
        [
            [0, 0.0, 0.0, 111.9, 112.0],  # sqrt(area) just under 112: level 0
            [0, 0.0, 0.0, 112.0, 112.0],  # 112: level 1
            [1, 10.0, 10.0, 234.0, 234.0],  # 224: level 2
            [1, 0.0, 0.0, 448.0, 448.0],  # 448: level 3
            [0, 0.0, 0.0, 2000.0, 2000.0],  # beyond: clamped to level 3
            [0, 5.0, 5.0, 9.0, 9.0],  # tiny: level 0
        ]
    )
    assert roi_levels_reference(rois, 4, 56.0).tolist() == [0, 1, 2, 3, 3, 0]
    generator = torch.Generator().manual_seed(0)
    features = [torch.randn(2, 3, 64 // s, 64 // s, generator=generator) for s in (4, 8, 16, 32)]
    pooled = multilevel_roi_align_reference(features, rois, 2, (4, 8, 16, 32), 56.0)
    for index, level in enumerate([0, 1, 2, 3, 3, 0]):
        expected = roi_align_reference(
            features[level], rois[index : index + 1], 2, 1 / 4 / 2**level
        )
        torch.testing.assert_close(pooled[index : index + 1], expected, rtol=0, atol=0)


# -------------------------------------------------------------------------------------------------
# JAX against the reference.


@pytest.mark.parametrize('output_size', [7, 14])
@pytest.mark.parametrize('aligned', [True, False])
def test_roi_align_matches_reference_within_the_cap(output_size, aligned):
    rng = np.random.default_rng(1)
    features = rng.standard_normal((40, 48, 5)).astype(np.float32)
    long_plan, short_plan = sampling_plan(output_size)
    # Stride 4 on a 160 x 192 image, partly outside too; the sides reach the caps exactly: 56 map
    # pixels on the long axis, 28 on the short one (wide and tall), and just under; 42 x 21, exact
    # multiples of 7 and 14 where a rounded reciprocal would make ceil(length / out) too large.
    rois = random_rois(rng, 150, 160, 192, (4, 130), 0.8, inside=False)
    edges = [
        [10, 20, 234, 132],
        [20, 10, 132, 234],
        [-30, 1, 193.9, 112.9],
        [1, -30, 112.9, 193.9],
        [4, 8, 172, 92],
    ]
    rois = np.concatenate([rois, np.float32(edges), np.float32(TINY_ROIS) * 4])
    grids = adaptive_grids(rois, output_size, 0.25)
    within = (grids.max(axis=1) <= long_plan.max_grid) & (grids.min(axis=1) <= short_plan.max_grid)
    assert within.mean() > 0.9
    rois, grids = rois[within], grids[within]
    cap = [long_plan.max_grid, short_plan.max_grid]
    assert grids[-16:-12].tolist() == [cap[::-1], cap, cap[::-1], cap]
    assert grids[-12].tolist() == [-(-21 // output_size), 42 // output_size]
    assert (np.asarray(edges)[:, 2:] - np.asarray(edges)[:, :2]).max() == 224  # 56 map pixels
    # Not aligned, the lengths are the same but at least 1: within the caps too.
    pool = jax.jit(
        functools.partial(roi_align, output_size=output_size, spatial_scale=0.25, aligned=aligned)
    )
    pooled = np.asarray(pool(features, rois))
    assert pooled.shape == (len(rois), output_size, output_size, 5)
    expected = reference(features, rois, output_size, 0.25, aligned=aligned)
    assert_close(pooled, expected, np.abs(features).max())


@pytest.mark.parametrize('aligned', [True, False])
def test_fixed_sampling_ratio_is_exact_at_any_size(aligned):
    rng = np.random.default_rng(2)
    features = rng.standard_normal((30, 26, 4)).astype(np.float32)
    # Up to 4x the map: samples several pixels apart.
    rois = random_rois(rng, 60, 60, 52, (1, 200), 1.0, inside=False)
    pool = jax.jit(
        functools.partial(
            roi_align, output_size=7, spatial_scale=0.5, sampling_ratio=2, aligned=aligned
        )
    )
    expected = reference(features, rois, 7, 0.5, sampling_ratio=2, aligned=aligned)
    assert_close(np.asarray(pool(features, rois)), expected, np.abs(features).max())


def test_cap_boundary_and_capped_semantics():
    """max_samples 4 at 7 x 7: long axes exact up to grid 4 (window of 30), short axes up to
    grid 2 (16); beyond, 2 and 1 samples per bin on the capped axis (mmcv's formula with that
    grid)."""
    long_plan, short_plan = sampling_plan(7, max_samples=4)
    assert (long_plan.slots, long_plan.max_grid, long_plan.pair_grid) == (30, 4, 2)
    assert (short_plan.slots, short_plan.max_grid, short_plan.pair_grid) == (16, 2, 1)
    rng = np.random.default_rng(3)
    features = rng.standard_normal((24, 30, 3)).astype(np.float32)
    rois = np.asarray(
        [
            [2.0, 3.0, 30.0, 9.0],  # wide: 28 x 6 map pixels, grids (1, 4): exact
            [2.0, 1.0, 8.0, 29.0],  # tall: 6 x 28, grids (4, 1), partly outside: exact
            [1.0, 3.0, 29.5, 9.0],  # wide, 28.5 x 6: grid_x 5 > 4, 2 samples along x
            [1.0, 1.0, 16.0, 41.0],  # tall, 15 x 40: grid_y 6 > 4 (long), grid_x 3 > 2 (short)
            [-6.0, 20.0, 29.0, 23.5],  # wide, 35 x 3.5, partly outside: grid_x 5 > 4
        ],
        np.float32,
    )
    pool = jax.jit(functools.partial(roi_align, output_size=7, spatial_scale=1.0, max_samples=4))
    pooled = np.asarray(pool(features, rois))
    exact = reference(features, rois, 7, 1.0)
    scale = np.abs(features).max()
    assert_close(pooled[:2], exact[:2], scale)
    grids = adaptive_grids(rois, 7, 1.0)
    assert grids.tolist() == [[1, 4], [4, 1], [1, 5], [6, 3], [1, 5]]
    capped_grids = [(1, 2), (2, 1), (1, 2)]
    chw = features.transpose(2, 0, 1)
    for index, grid in zip(range(2, 5), capped_grids, strict=True):
        expected = loop_roi_align(chw, rois[index], 7, 1.0, grids=grid).transpose(1, 2, 0)
        assert_close(pooled[index], expected, scale)
        difference = np.abs(pooled[index] - exact[index])
        # The cap changes the result, within the range of what each bin reads (0 included).
        assert difference.max() > 0.05
        x1, y1, x2, y2 = rois[index] - 0.5
        for p in range(7):
            rows = np.clip([y1 + p * (y2 - y1) / 7, y1 + (p + 1) * (y2 - y1) / 7], 0, 23)
            for q in range(7):
                cols = np.clip([x1 + q * (x2 - x1) / 7, x1 + (q + 1) * (x2 - x1) / 7], 0, 29)
                read = features[
                    int(rows[0]) : int(rows[1]) + 2, int(cols[0]) : int(cols[1]) + 2
                ].reshape(-1, 3)
                spread = np.maximum(read.max(0), 0) - np.minimum(read.min(0), 0)
                assert (difference[p, q] <= spread + 1e-5).all(), (index, p, q)


def test_roi_levels():
    rng = np.random.default_rng(4)
    rois = random_rois(rng, 500, 800, 1344, (4, 1200), 1.0)
    edges = np.asarray(
        [[0, 0, s, s] for s in (0.0, 111.99, 112.0, 223.99, 224.0, 448.0, 5000.0)], np.float32
    )
    rois = np.concatenate([rois, edges])
    expected = roi_levels_reference(torch.tensor(np.pad(rois, ((0, 0), (1, 0)))), 4, 56.0)
    levels = np.asarray(jax.jit(roi_levels)(rois))
    assert levels.dtype == np.int32
    np.testing.assert_array_equal(levels, expected.numpy())
    assert levels[-7:].tolist() == [0, 0, 1, 1, 2, 3, 3]
    assert set(levels[:500].tolist()) == {0, 1, 2, 3}
    assert np.asarray(roi_levels(rois.reshape(-1, 1, 4), num_levels=2)).shape == (len(rois), 1)
    # Negative, NaN and empty areas go to level 0.
    odd = jnp.asarray([[5, 5, 1, 9], [np.nan, 0, 4, 4], [3, 3, 3, 3]], jnp.float32)
    assert np.asarray(roi_levels(odd)).tolist() == [0, 0, 0]


def test_multilevel_matches_reference_and_pads_stay_finite():
    rng = np.random.default_rng(5)
    height, width, channels = 480, 640, 4
    features = [
        rng.standard_normal((2, height // s, width // s, channels)).astype(np.float32)
        for s in (4, 8, 16, 32, 64)
    ]
    rois = random_rois(rng, 2 * 40, height, width, (10, 600), 0.6).reshape(2, 40, 4)
    rois[0, :2] = [[0, 0, width, height], [30, 20, 610, 470]]  # levels 3 (the whole image), 2
    # Padding in the last 6 slots of image 1: zeros, NaNs, infinities, huge and inverted boxes.
    rois[1, -6:] = [
        [0, 0, 0, 0],
        [np.nan, np.nan, np.nan, np.nan],
        [-np.inf, -np.inf, np.inf, np.inf],
        [-3e38, -3e38, 3e38, 3e38],
        [1e30, 5.0, -1e30, 7.0],
        [np.nan, 4.0, np.inf, 9.0],
    ]
    pool = jax.jit(functools.partial(multilevel_roi_align, output_size=7))
    pooled = np.asarray(pool([jnp.asarray(f) for f in features], rois))
    assert pooled.shape == (2, 40, 7, 7, channels)
    assert np.isfinite(pooled).all()
    assert not pooled[1, -6:].any()  # empty or inverted, or all samples outside the maps
    valid = np.concatenate([rois[0], rois[1, :-6]])
    image = np.repeat([0, 1], [40, 34])
    rois_t = torch.tensor(np.concatenate([image[:, None].astype(np.float32), valid], axis=1))
    levels = roi_levels_reference(rois_t, 4, 56.0).numpy()
    assert set(levels.tolist()) == {0, 1, 2, 3}
    expected = multilevel_roi_align_reference(
        [torch.tensor(f.transpose(0, 3, 1, 2)) for f in features], rois_t, 7, (4, 8, 16, 32), 56.0
    )
    expected = expected.numpy().transpose(0, 2, 3, 1)
    actual = np.concatenate([pooled[0], pooled[1, :-6]])
    assert_close(actual, expected, max(np.abs(f).max() for f in features))


def test_jit_vmap_and_dtype():
    rng = np.random.default_rng(6)
    features = rng.standard_normal((3, 20, 24, 2)).astype(np.float32)
    rois = random_rois(rng, 3 * 16, 80, 96, (4, 80), 0.7).reshape(3, 16, 4)
    pool = functools.partial(roi_align, output_size=7, spatial_scale=0.25)
    batched = np.asarray(jax.jit(jax.vmap(pool))(features, rois))
    single = jax.jit(pool)
    for image in range(3):
        assert_close(batched[image], single(features[image], rois[image]), 4.0)
        assert_close(batched[image], reference(features[image], rois[image], 7, 0.25), 4.0)
    pooled_bf16 = single(jnp.asarray(features[0], jnp.bfloat16), rois[0])
    assert pooled_bf16.dtype == jnp.bfloat16
    expected = single(jnp.asarray(features[0], jnp.bfloat16).astype(jnp.float32), rois[0])
    np.testing.assert_allclose(np.asarray(pooled_bf16, np.float32), expected, atol=0.02)


def test_chunks_of_rois_match_one_batch(monkeypatch):
    rng = np.random.default_rng(8)
    maps = [rng.standard_normal((2, 64 // s, 80 // s, 3)).astype(np.float32) for s in (4, 8)]
    rois = random_rois(rng, 2 * 9, 64, 80, (4, 90), 0.7, inside=False).reshape(2, 9, 4)
    cotangent = rng.standard_normal((2, 9, 7, 7, 3)).astype(np.float32)

    def pool_and_gradient(maps):
        pool = functools.partial(
            multilevel_roi_align, output_size=7, strides=(4, 8), finest_scale=16.0
        )
        pooled, vjp = jax.vjp(lambda m: pool(m, rois), maps)
        return pooled, vjp(cotangent)[0]

    pooled, gradients = jax.jit(pool_and_gradient)(maps)
    long_plan, short_plan = sampling_plan(7)
    patch_bytes = long_plan.slots * short_plan.slots * 3 * 4
    # Chunks of 4 RoIs: 4 of them and a remainder of 2.
    monkeypatch.setattr(roi_align_lib, 'PATCH_BYTES', 4 * patch_bytes + patch_bytes // 2)
    chunked, chunked_gradients = jax.jit(pool_and_gradient)(maps)
    assert_close(chunked, pooled, 4.0)
    for chunked_gradient, gradient in zip(chunked_gradients, gradients, strict=True):
        assert_close(chunked_gradient, gradient, 4.0)
    assert np.abs(pooled).max() > 0.5 and np.abs(gradients[1]).max() > 0.5


def test_gradients_match_reference_autograd():
    rng = np.random.default_rng(7)
    features = rng.standard_normal((18, 22, 3)).astype(np.float32)
    rois = np.concatenate(
        [random_rois(rng, 20, 72, 88, (2, 90), 0.7, inside=False), np.float32(TINY_ROIS) * 4]
    )
    cotangent = rng.standard_normal((len(rois), 7, 7, 3)).astype(np.float32)

    def loss(f):
        return jnp.sum(roi_align(f, rois, output_size=7, spatial_scale=0.25) * cotangent)

    gradient = np.asarray(jax.jit(jax.grad(loss))(features))
    features_t = torch.tensor(features.transpose(2, 0, 1))[None].requires_grad_()
    indexed = torch.tensor(np.pad(rois, ((0, 0), (1, 0))))
    pooled_t = roi_align_reference(features_t, indexed, 7, 0.25)
    (pooled_t * torch.tensor(cotangent.transpose(0, 3, 1, 2))).sum().backward()
    expected = features_t.grad[0].numpy().transpose(1, 2, 0)
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(gradient, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())

    # Multilevel, padded RoIs included: finite gradients for every map but the unused 5th.
    maps = [
        jnp.asarray(rng.standard_normal((1, 64 // s, 64 // s, 2)), jnp.float32)
        for s in (4, 8, 16, 32, 64)
    ]
    boxes = np.asarray(
        [[[3, 4, 30, 50], [0, 0, 64, 64], [np.nan, 0, np.inf, 9], [0, 0, 0, 0]]], np.float32
    )

    def squares(maps):
        return jnp.sum(multilevel_roi_align(maps, boxes, output_size=7) ** 2)

    grads = jax.jit(jax.grad(squares))(maps)
    assert all(np.isfinite(g).all() for g in grads)
    assert [bool(np.abs(g).max() > 0) for g in grads] == [True, False, False, False, False]


def test_bad_input():
    features = jnp.zeros((8, 8, 2))
    rois = jnp.zeros((3, 4))
    with pytest.raises(ValueError, match=r'features must be \(H, W, C\), got shape \(8, 8\)'):
        roi_align(features[..., 0], rois, output_size=7, spatial_scale=1.0)
    with pytest.raises(ValueError, match=r'rois must be \(R, 4\).*got shape \(3, 5\)'):
        roi_align(features, jnp.zeros((3, 5)), output_size=7, spatial_scale=1.0)
    with pytest.raises(ValueError, match='output_size must be a positive int, got 0'):
        roi_align(features, rois, output_size=0, spatial_scale=1.0)
    with pytest.raises(ValueError, match='sampling_ratio must be an int >= 0, got -1'):
        roi_align(features, rois, output_size=7, spatial_scale=1.0, sampling_ratio=-1)
    with pytest.raises(ValueError, match='max_samples must be a positive int or None, got 0'):
        roi_align(features, rois, output_size=7, spatial_scale=1.0, max_samples=0)
    with pytest.raises(ValueError, match='spatial_scale must be > 0, got 0'):
        roi_align(features, rois, output_size=7, spatial_scale=0)
    maps = [jnp.zeros((2, 8 // 2**i, 8 // 2**i, 2)) for i in range(4)]
    with pytest.raises(ValueError, match=r'a map per stride \(4\), got 3 maps'):
        multilevel_roi_align(maps[:3], jnp.zeros((2, 3, 4)), output_size=7)
    with pytest.raises(ValueError, match=r'rois must be \(B, R, 4\).*got shape \(3, 4\)'):
        multilevel_roi_align(maps, rois, output_size=7)
    with pytest.raises(ValueError, match=r'features\[2\] must be \(B=2, H, W, C=2\), got'):
        multilevel_roi_align(
            [*maps[:2], jnp.zeros((1, 2, 2, 2)), *maps[3:]], jnp.zeros((2, 3, 4)), output_size=7
        )
    with pytest.raises(ValueError, match=r'rois must be \(\.\.\., 4\)'):
        roi_levels(jnp.zeros((3, 2)))


# -------------------------------------------------------------------------------------------------
# The cap's measurement (not a test: `python tests/test_roi_align.py`).


def smooth_noise(rng, shape, width):
    """Gaussian noise (B, H, W, C) blurred by a Gaussian of `width` pixels along H and W,
    rescaled to standard deviation 1."""
    noise = rng.standard_normal(shape)
    taps = np.arange(-3 * width, 3 * width + 1)
    kernel = np.exp(-0.5 * (taps / width) ** 2)
    kernel /= kernel.sum()
    for axis in (1, 2):
        noise = np.apply_along_axis(np.convolve, axis, noise, kernel, mode='same')
    return (noise / noise.std()).astype(np.float32)


def measure_cap(count=20000, channels=4, seed=0):
    """Prints, per output size at the default max_samples, how often realistic RoIs of an
    800 x 1344 image hit the cap and how far the capped ones are from mmcv's exact RoIAlign, on
    white-noise maps and on smooth maps (noise blurred over ~2 pixels), both of std 1."""
    rng = np.random.default_rng(seed)
    strides = (4, 8, 16, 32)
    rois = random_rois(rng, count, 800, 1344, (8, 900), 0.7)
    rois_t = torch.tensor(np.pad(rois, ((0, 0), (1, 0))))
    levels = roi_levels_reference(rois_t, 4, 56.0).numpy()
    print(f'{count} RoIs; per level: {np.bincount(levels, minlength=4).tolist()}')
    for kind in ('white', 'smooth'):
        shapes = [(1, 800 // s, 1344 // s, channels) for s in strides]
        if kind == 'white':
            maps = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
        else:
            maps = [smooth_noise(rng, shape, 2) for shape in shapes]
        maps_t = [torch.tensor(m.transpose(0, 3, 1, 2)) for m in maps]
        for output_size in (7, 14):
            long_plan, short_plan = sampling_plan(output_size)
            start = time.perf_counter()
            exact = multilevel_roi_align_reference(maps_t, rois_t, output_size, strides, 56.0)
            exact = exact.numpy().transpose(0, 2, 3, 1)
            seconds = time.perf_counter() - start
            pool = jax.jit(functools.partial(multilevel_roi_align, output_size=output_size))
            pooled = np.concatenate(
                [np.asarray(pool(maps, chunk[None]))[0] for chunk in np.split(rois, count // 1000)]
            )
            grids = np.zeros((count, 2), int)
            for level, stride in enumerate(strides):
                chosen = levels == level
                grids[chosen] = adaptive_grids(rois[chosen], output_size, 1 / stride)
            capped = (grids.max(1) > long_plan.max_grid) | (grids.min(1) > short_plan.max_grid)
            difference = np.abs(pooled - exact).reshape(count, -1).max(axis=1)
            print(
                f'{kind} maps, {output_size} x {output_size} (long cap {long_plan.max_grid}, '
                f'short cap {short_plan.max_grid}; reference {seconds:.0f} s): '
                f'{capped.mean():.2%} of the RoIs capped; max |difference| '
                f'{difference[~capped].max():.2e} uncapped, '
                f'{difference[capped].max() if capped.any() else 0:.3f} capped (mean over the '
                f'capped RoIs of their max '
                f'{difference[capped].mean() if capped.any() else 0:.3f})'
            )


if __name__ == '__main__':
    jax.config.update('jax_platforms', 'cpu')
    measure_cap()
