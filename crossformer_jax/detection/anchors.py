"""Anchors of a feature pyramid (MMDetection's AnchorGenerator semantics).

Level l (stride s) places A = len(ratios) * scales_per_octave anchors at every position (x * s,
y * s) of its (H_l, W_l) map, ordered (y, x, a): the order of a head's outputs reshaped from
(H_l, W_l, A * K) to (H_l * W_l * A, K). Anchors are computed with NumPy at trace time (their
shapes follow the static feature sizes); the per-image valid flags are JAX arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def pad_shape(image_sizes, size_divisor: int = 32):
    """(B, 2) int (height, width) -> (B, 2) int: each rounded up to a multiple of size_divisor.

    A JAX array gives a JAX array (jit-able), anything else a NumPy array.
    """
    if not isinstance(image_sizes, jax.Array):
        image_sizes = np.asarray(image_sizes)
    if size_divisor < 1:
        raise ValueError(f'size_divisor must be a positive integer, got {size_divisor!r}')
    if image_sizes.ndim != 2 or image_sizes.shape[-1] != 2:
        raise ValueError(
            f'image_sizes must be (B, 2) (height, width), got shape {tuple(image_sizes.shape)}'
        )
    return -(-image_sizes // size_divisor) * size_divisor


def flatten_levels(outputs: Sequence[jax.Array], width: int) -> jax.Array:
    """Per-level (B, H_l, W_l, A * width) -> (B, sum_l H_l * W_l * A, width), rows in level then
    (y, x, a) order: the order of the concatenated grid_anchors."""
    return jnp.concatenate([x.reshape(x.shape[0], -1, width) for x in outputs], axis=1)


@dataclasses.dataclass(frozen=True)
class AnchorGenerator:
    """Anchors at every position of each pyramid level (RetinaNet's defaults).

    Level l has stride strides[l]; its base anchors are centred on (0, 0), of side
    stride * octave_base_scale * 2**(i / scales_per_octave) (i < scales_per_octave) for each
    aspect ratio h / w in ratios, ratio-major.
    """

    strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    octave_base_scale: float = 4.0
    scales_per_octave: int = 3
    ratios: tuple[float, ...] = (0.5, 1.0, 2.0)

    def __post_init__(self):
        if not self.strides or any(s < 1 for s in self.strides):
            raise ValueError(f'strides must be positive integers, got {self.strides!r}')
        if self.scales_per_octave < 1:
            raise ValueError(f'scales_per_octave must be >= 1, got {self.scales_per_octave!r}')
        if not self.ratios or any(r <= 0 for r in self.ratios):
            raise ValueError(f'ratios must be positive, got {self.ratios!r}')

    @property
    def num_anchors(self) -> int:
        """Anchors per position."""
        return len(self.ratios) * self.scales_per_octave

    @property
    def num_levels(self) -> int:
        """Pyramid levels (one per stride)."""
        return len(self.strides)

    def base_anchors(self, level: int) -> np.ndarray:
        """(A, 4) float32 xyxy anchors of a level centred on (0, 0), ratio-major.

        In float32 arithmetic, in the order MMDetection computes them (so the values agree to the
        last bit): widths stride * (1 / sqrt(ratio)) * scale, heights stride * sqrt(ratio) * scale.
        """
        if not 0 <= level < self.num_levels:
            raise ValueError(f'level must be in [0, {self.num_levels}), got {level!r}')
        stride = np.float32(self.strides[level])
        # The scales are computed in float64, then stored in float32 (as MMDetection does).
        octave_scales = 2.0 ** (np.arange(self.scales_per_octave) / self.scales_per_octave)
        scales = (octave_scales * self.octave_base_scale).astype(np.float32)
        h_ratios = np.sqrt(np.asarray(self.ratios, np.float32))
        w_ratios = np.float32(1.0) / h_ratios
        widths = (stride * w_ratios[:, None] * scales[None, :]).reshape(-1)
        heights = (stride * h_ratios[:, None] * scales[None, :]).reshape(-1)
        half_w, half_h = np.float32(0.5) * widths, np.float32(0.5) * heights
        return np.stack([-half_w, -half_h, half_w, half_h], axis=-1)

    def feature_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """(H_l, W_l) of each level for a padded (height, width) input, as the network computes
        them: level 0 is ceil(size / strides[0]) (exact for inputs that are multiples of 32), each
        further level ceil(previous / 2) (a 3x3 stride-2 pad-1 convolution).

        800 x 1344 -> (100, 168), (50, 84), (25, 42), (13, 21), (7, 11).
        """
        if height < 1 or width < 1:
            raise ValueError(f'input size must be positive, got {height} x {width}')
        for previous, stride in zip(self.strides, self.strides[1:]):
            if stride != 2 * previous:
                raise ValueError(
                    f'feature_sizes needs strides that double from level to level, got '
                    f'{self.strides!r}'
                )
        h, w = -(-height // self.strides[0]), -(-width // self.strides[0])
        sizes = [(h, w)]
        for _ in self.strides[1:]:
            h, w = -(-h // 2), -(-w // 2)
            sizes.append((h, w))
        return sizes

    def check_feature_sizes(self, feature_sizes: Sequence[tuple[int, int]]) -> None:
        """Raises ValueError unless there is one positive (H_l, W_l) per level."""
        if len(feature_sizes) != self.num_levels:
            raise ValueError(
                f'expected {self.num_levels} feature sizes (one per stride {self.strides}), got '
                f'{len(feature_sizes)}'
            )
        for level, size in enumerate(feature_sizes):
            if len(size) != 2 or size[0] < 1 or size[1] < 1:
                raise ValueError(f'feature size of level {level} must be (H, W) > 0, got {size!r}')

    def grid_anchors(self, feature_sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Per level, (H_l * W_l * A, 4) float32 xyxy anchors in (y, x, a) order."""
        self.check_feature_sizes(feature_sizes)
        anchors = []
        for level, (h, w) in enumerate(feature_sizes):
            stride = self.strides[level]
            shift_y, shift_x = np.meshgrid(
                np.arange(h, dtype=np.float32) * stride,
                np.arange(w, dtype=np.float32) * stride,
                indexing='ij',
            )
            shifts = np.stack([shift_x, shift_y, shift_x, shift_y], axis=-1).reshape(-1, 1, 4)
            anchors.append((shifts + self.base_anchors(level)[None]).reshape(-1, 4))
        return anchors

    def valid_flags(
        self, feature_sizes: Sequence[tuple[int, int]], pad_shapes: jax.Array
    ) -> list[jax.Array]:
        """Per level, (B, H_l * W_l * A) bool: the anchor's position lies on the image itself.

        pad_shapes (B, 2) int: each image's (height, width) padded to a multiple of 32 (before
        batch padding). Level l's anchors at x < ceil(pad_w / s), y < ceil(pad_h / s) are valid;
        the rest cover batch padding only.
        """
        self.check_feature_sizes(feature_sizes)
        pad_shapes = jnp.asarray(pad_shapes)
        if pad_shapes.ndim != 2 or pad_shapes.shape[-1] != 2:
            raise ValueError(
                f'pad_shapes must be (B, 2) (height, width), got shape {tuple(pad_shapes.shape)}'
            )
        batch = pad_shapes.shape[0]
        flags = []
        for level, (h, w) in enumerate(feature_sizes):
            stride = self.strides[level]
            valid_h = -(-pad_shapes[:, 0] // stride)
            valid_w = -(-pad_shapes[:, 1] // stride)
            rows = jnp.arange(h)[None, :, None] < valid_h[:, None, None]
            cols = jnp.arange(w)[None, None, :] < valid_w[:, None, None]
            positions = rows & cols  # (B, H_l, W_l)
            flags.append(
                jnp.broadcast_to(positions[..., None], (batch, h, w, self.num_anchors)).reshape(
                    batch, -1
                )
            )
        return flags

    def output_sizes(
        self, class_logits: Sequence[jax.Array], box_deltas: Sequence[jax.Array]
    ) -> tuple[list[tuple[int, int]], int]:
        """Checks a head's per-level outputs, class_logits (B, H_l, W_l, A * K) and box_deltas
        (B, H_l, W_l, A * 4), against the generator; returns the feature sizes and K."""
        levels = self.num_levels
        if len(class_logits) != levels or len(box_deltas) != levels:
            raise ValueError(
                f'expected {levels} levels of class logits and box deltas (strides '
                f'{self.strides}), got {len(class_logits)} and {len(box_deltas)}'
            )
        a = self.num_anchors
        first = class_logits[0]
        if first.ndim != 4 or first.shape[-1] % a:
            raise ValueError(
                f'class logits of level 0 must be (B, H, W, {a} * K), got shape {first.shape}'
            )
        batch, num_classes = first.shape[0], first.shape[-1] // a
        sizes = []
        for level, (logits, deltas) in enumerate(zip(class_logits, box_deltas)):
            h, w = logits.shape[1:3] if logits.ndim == 4 else (None, None)
            if logits.shape != (batch, h, w, a * num_classes):
                raise ValueError(
                    f'class logits of level {level}: expected (B={batch}, H, W, '
                    f'{a * num_classes}), got shape {logits.shape}'
                )
            if deltas.shape != (batch, h, w, a * 4):
                raise ValueError(
                    f'box deltas of level {level}: expected {(batch, h, w, a * 4)} (the class '
                    f'logits are {logits.shape}), got shape {deltas.shape}'
                )
            sizes.append((h, w))
        return sizes, num_classes
