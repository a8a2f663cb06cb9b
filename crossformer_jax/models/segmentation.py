"""Semantic segmentation on the CrossFormer backbone: UPerNet and Semantic FPN (channels-last).

Both are the MMSegmentation heads of the published ADE20K models, rebuilt in Flax:

- UPerNet (`decode_head`): pyramid pooling on the last stage map (scales 1, 2, 3, 6), an FPN over
  the four maps, all fused at stride 4 by `fpn_bottleneck`; plus the auxiliary FCN head
  (`auxiliary_head`) on the stride-16 map, run in training only.
- Semantic FPN: an FPN `neck` (convolutions with bias, nearest top-down upsampling) and the FPN
  head (`decode_head.scale_heads`) that brings every level to stride 4 and sums them.

Module and parameter names mirror the MMSegmentation state dicts (`psp_modules_0_1` is
`psp_modules.0.1`, a ConvModule's `conv` / `bn`, BatchNorm `scale` / `bias` for `weight` / `bias`
and batch statistics `mean` / `var` for `running_mean` / `running_var`); docs/parameter_names.md
lists the mapping.

    model = create_model('upernet_crossformer_small', num_classes=150)
    variables = model.init(rng, images)                       # {'params', 'batch_stats'}
    logits = model.apply(variables, images)                   # (N, H, W, classes) float32
    (logits, aux_logits), updates = model.apply(
        variables, images, train=True, rngs={'dropout': key}, mutable=['batch_stats'])

images are (N, H, W, 3) with H and W multiples of 32; logits come at the input resolution.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from crossformer_jax.models.crossformer import (
    DENSE_BACKBONE_FIELDS,
    CrossFormer,
    dense_model_config,
    normalize_backbone_fields,
)
from crossformer_jax.models.registry import register_model

BATCH_NORM_MOMENTUM = 0.9  # running = 0.9 * running + 0.1 * batch (PyTorch's momentum 0.1)
BATCH_NORM_EPS = 1e-5
POOL_SCALES = (1, 2, 3, 6)


# -------------------------------------------------------------------------------------------------
# Resampling, exactly as PyTorch computes it.


@functools.cache
def _bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices i0, i1 and weight of i1 for F.interpolate(bilinear, align_corners=False)."""
    # In float32 arithmetic, as PyTorch computes it (float64 would differ by ~1e-6 when shrinking).
    scale = np.float32(in_size) / np.float32(out_size)
    src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1).astype(np.int32)
    weight = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    return i0, i1, weight


def _bilinear_axis(x: jax.Array, axis: int, out_size: int) -> jax.Array:
    in_size = x.shape[axis]
    if in_size == out_size:
        return x
    i0, i1, weight = _bilinear_taps(in_size, out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    weight = jnp.asarray(weight.reshape(shape), x.dtype)
    return jnp.take(x, i0, axis=axis) * (1 - weight) + jnp.take(x, i1, axis=axis) * weight


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """(N, H, W, C) -> (N, size[0], size[1], C): PyTorch's F.interpolate(mode='bilinear',
    align_corners=False), no antialiasing when shrinking (half-pixel source coordinates clamped
    at the borders, two taps per axis). Equal to jax.image.resize(..., 'bilinear',
    antialias=False) up to rounding; this gather form costs 4 taps per output pixel."""
    return _bilinear_axis(_bilinear_axis(x, 1, int(size[0])), 2, int(size[1]))


def resize_nearest(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """(N, H, W, C) -> (N, size[0], size[1], C): PyTorch's F.interpolate(mode='nearest'), source
    index floor(dst * in / out)."""
    for axis, out_size in ((1, int(size[0])), (2, int(size[1]))):
        in_size = x.shape[axis]
        if in_size != out_size:
            index = np.minimum(np.floor(np.arange(out_size) * (in_size / out_size)), in_size - 1)
            x = jnp.take(x, index.astype(np.int32), axis=axis)
    return x


@functools.cache
def adaptive_pool_matrix(length: int, bins: int) -> np.ndarray:
    """(bins, length) averaging weights of AdaptiveAvgPool: bin i covers
    [floor(i * length / bins), ceil((i + 1) * length / bins))."""
    matrix = np.zeros((bins, length), np.float32)
    for i in range(bins):
        start, end = (i * length) // bins, -(-((i + 1) * length) // bins)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def adaptive_avg_pool(x: jax.Array, bins: int) -> jax.Array:
    """(N, H, W, C) -> (N, bins, bins, C), PyTorch's AdaptiveAvgPool2d (bins of uneven size when
    H or W is not a multiple of bins)."""
    rows = jnp.asarray(adaptive_pool_matrix(x.shape[1], bins), x.dtype)
    cols = jnp.asarray(adaptive_pool_matrix(x.shape[2], bins), x.dtype)
    return jnp.einsum('ih,jw,nhwc->nijc', rows, cols, x, precision=jax.lax.Precision.HIGHEST)


# -------------------------------------------------------------------------------------------------
# Layers.


class BatchNorm(nn.Module):
    """BatchNorm over all axes but the last, with PyTorch's (Sync)BatchNorm2d semantics.

    Variables as flax's nn.BatchNorm: params 'scale', 'bias'; batch_stats 'mean', 'var' (float32).
    Training normalises with the batch mean and biased variance and updates the running
    statistics with momentum 0.9 (PyTorch's 0.1), the variance unbiased (n / (n - 1), n the
    number of values per channel), as PyTorch does; evaluation uses the running statistics.

    Synchronised BatchNorm needs nothing more: under jit, a batch sharded over devices with a
    NamedSharding is one global array, so the means over its batch axis are already global.
    """

    momentum: float = BATCH_NORM_MOMENTUM
    epsilon: float = BATCH_NORM_EPS
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """x: (N, H, W, C) -> (N, H, W, C) in `dtype`."""
        channels = x.shape[-1]
        scale = self.param('scale', nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param('bias', nn.initializers.zeros, (channels,), jnp.float32)
        running_mean = self.variable(
            'batch_stats', 'mean', lambda: jnp.zeros((channels,), jnp.float32)
        )
        running_var = self.variable(
            'batch_stats', 'var', lambda: jnp.ones((channels,), jnp.float32)
        )
        x = x.astype(jnp.float32)
        axes = tuple(range(x.ndim - 1))
        if train:
            mean = jnp.mean(x, axis=axes)
            var = jnp.mean(jnp.square(x - mean), axis=axes)
            if not self.is_initializing():
                count = x.size // channels
                unbiased = var * (count / (count - 1)) if count > 1 else var
                keep = self.momentum
                running_mean.value = keep * running_mean.value + (1 - keep) * mean
                running_var.value = keep * running_var.value + (1 - keep) * unbiased
        else:
            mean, var = running_mean.value, running_var.value
        multiplier = scale * jax.lax.rsqrt(var + self.epsilon)
        return ((x - mean) * multiplier + bias).astype(self.dtype)


class ConvModule(nn.Module):
    """MMSegmentation's ConvModule: conv (no bias) -> BatchNorm -> ReLU, submodules 'conv' and
    'bn'; with norm=False a conv with bias and no activation (the FPN neck)."""

    features: int
    kernel: int
    norm: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """x: (N, H, W, Cin) -> (N, H, W, features); 'same' padding (kernel // 2)."""
        pad = self.kernel // 2
        if self.norm:  # Kaiming normal, fan_out (mmcv's ConvModule init)
            kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
        else:  # Xavier uniform (the FPN neck's init)
            kernel_init = nn.initializers.xavier_uniform()
        x = nn.Conv(
            self.features,
            (self.kernel, self.kernel),
            padding=((pad, pad), (pad, pad)),
            use_bias=not self.norm,
            dtype=self.dtype,
            kernel_init=kernel_init,
            name='conv',
        )(x)
        if not self.norm:
            return x
        return nn.relu(BatchNorm(dtype=self.dtype, name='bn')(x, train))


def _classify(module: nn.Module, x: jax.Array, train: bool) -> jax.Array:
    """cls_seg of a head (fields num_classes, dropout_rate, dtype): Dropout2d (whole channels,
    training only) -> 1x1 conv with bias, named 'conv_seg' directly under that head."""
    x = nn.Dropout(module.dropout_rate, broadcast_dims=(1, 2))(x, deterministic=not train)
    return nn.Conv(
        module.num_classes,
        (1, 1),
        dtype=module.dtype,
        kernel_init=nn.initializers.normal(0.01),
        name='conv_seg',
    )(x)


class UPerHead(nn.Module):
    """UPerNet decode head: pyramid pooling on x3, FPN fusion, logits at stride 4."""

    num_classes: int
    channels: int = 512
    pool_scales: Sequence[int] = POOL_SCALES
    dropout_rate: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], train: bool) -> jax.Array:
        """features: 4 maps (N, H/4·2^-i, W/4·2^-i, C_i) -> logits (N, H/4, W/4, num_classes)."""
        x3 = features[-1]
        size3 = x3.shape[1:3]
        pooled = [
            resize_bilinear(
                ConvModule(self.channels, 1, dtype=self.dtype, name=f'psp_modules_{k}_1')(
                    adaptive_avg_pool(x3, scale), train
                ),
                size3,
            )
            for k, scale in enumerate(self.pool_scales)
        ]
        top = ConvModule(self.channels, 3, dtype=self.dtype, name='bottleneck')(
            jnp.concatenate([x3, *pooled], axis=-1), train
        )
        laterals = [
            ConvModule(self.channels, 1, dtype=self.dtype, name=f'lateral_convs_{i}')(x, train)
            for i, x in enumerate(features[:-1])
        ] + [top]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize_bilinear(
                laterals[i], laterals[i - 1].shape[1:3]
            )
        outputs = [
            ConvModule(self.channels, 3, dtype=self.dtype, name=f'fpn_convs_{i}')(lateral, train)
            for i, lateral in enumerate(laterals[:-1])
        ] + [laterals[-1]]
        size0 = outputs[0].shape[1:3]
        fused = jnp.concatenate([resize_bilinear(o, size0) for o in outputs], axis=-1)
        fused = ConvModule(self.channels, 3, dtype=self.dtype, name='fpn_bottleneck')(fused, train)
        return _classify(self, fused, train)


class FCNHead(nn.Module):
    """Auxiliary FCN head: one ConvModule 3x3 (`convs_0`) -> cls_seg."""

    num_classes: int
    channels: int = 256
    dropout_rate: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """x: (N, h, w, C) -> logits (N, h, w, num_classes)."""
        x = ConvModule(self.channels, 3, dtype=self.dtype, name='convs_0')(x, train)
        return _classify(self, x, train)


class FPNNeck(nn.Module):
    """FPN neck: 1x1 laterals with bias, nearest top-down sum, 3x3 convs with bias."""

    channels: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array]) -> list[jax.Array]:
        """4 maps (N, h_i, w_i, C_i) -> 4 maps (N, h_i, w_i, channels)."""
        laterals = [
            ConvModule(self.channels, 1, norm=False, dtype=self.dtype, name=f'lateral_convs_{i}')(
                x, False
            )
            for i, x in enumerate(features)
        ]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize_nearest(
                laterals[i], laterals[i - 1].shape[1:3]
            )
        return [
            ConvModule(self.channels, 3, norm=False, dtype=self.dtype, name=f'fpn_convs_{i}')(
                lateral, False
            )
            for i, lateral in enumerate(laterals)
        ]


class FPNHead(nn.Module):
    """Semantic FPN head: scale head i (max(1, i) ConvModules 3x3, each followed by a bilinear x2
    upsample for i > 0) brings level i to stride 4; the sum goes through cls_seg."""

    num_classes: int
    channels: int = 128
    dropout_rate: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], train: bool) -> jax.Array:
        """4 maps (N, H/4·2^-i, W/4·2^-i, C) -> logits (N, H/4, W/4, num_classes)."""
        output = None
        for i, x in enumerate(features):
            for j in range(max(1, i)):
                # Sequential indices: the upsample modules (no weights) take the odd ones.
                x = ConvModule(
                    self.channels, 3, dtype=self.dtype, name=f'scale_heads_{i}_{2 * j if i else 0}'
                )(x, train)
                if i > 0:
                    x = resize_bilinear(x, (2 * x.shape[1], 2 * x.shape[2]))
            if output is None:
                output = x
            else:
                output = output + resize_bilinear(x, output.shape[1:3])
        return _classify(self, output, train)


# -------------------------------------------------------------------------------------------------
# The whole model.


class SegmentationModel(nn.Module):
    """CrossFormer backbone (`backbone`) + UPerNet (`decode_head`, `auxiliary_head`) or Semantic
    FPN (`neck`, `decode_head`).

    __call__(images (N, H, W, 3), train=False): logits (N, H, W, num_classes) float32; with
    train=True (logits, aux_logits), both (N, H, W, num_classes) float32, aux_logits None without
    an auxiliary head. Parameters and batch statistics are float32; `dtype` is the compute dtype.
    `dropout_rate` is the Dropout2d rate before each `conv_seg`.
    """

    head: str  # 'upernet' or 'fpn'
    embed_dim: int
    depths: Sequence[int]
    num_heads: Sequence[int]
    group_size: Sequence[int]
    interval: Sequence[int]
    version: str = 'v1'
    num_classes: int = 150
    head_channels: int = 512
    aux_channels: int | None = 256  # UPerNet's auxiliary FCN head; None: no auxiliary head
    neck_channels: int = 256  # Semantic FPN only
    dropout_rate: float = 0.1
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    patch_kernel_sizes: Sequence[int] = (4, 8, 16, 32)
    merge_kernel_sizes: Sequence[int] = (2, 4)
    remat: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False):
        backbone = segmentation_backbone(self, name='backbone')
        backbone.check_images(images)
        size = images.shape[1:3]
        features = backbone(images, train)
        if self.head == 'upernet':
            logits = UPerHead(
                self.num_classes,
                self.head_channels,
                dropout_rate=self.dropout_rate,
                dtype=self.dtype,
                name='decode_head',
            )(features, train)
        else:
            pyramid = FPNNeck(self.neck_channels, self.dtype, name='neck')(features)
            logits = FPNHead(
                self.num_classes,
                self.head_channels,
                dropout_rate=self.dropout_rate,
                dtype=self.dtype,
                name='decode_head',
            )(pyramid, train)
        logits = resize_bilinear(logits.astype(jnp.float32), size)
        if not train and not self.is_initializing():
            return logits
        aux_logits = None
        if self.head == 'upernet' and self.aux_channels is not None:
            aux_logits = FCNHead(
                self.num_classes,
                self.aux_channels,
                self.dropout_rate,
                self.dtype,
                name='auxiliary_head',
            )(features[2], train)
            aux_logits = resize_bilinear(aux_logits.astype(jnp.float32), size)
        if not train:
            return logits
        return logits, aux_logits


def segmentation_backbone(model: nn.Module, name: str | None = None) -> CrossFormer:
    """The features_only CrossFormer of a dense-prediction model carrying the backbone fields
    (SegmentationModel, detection.RetinaNet; its variables: params['backbone']; created inside
    the model's __call__ with name='backbone', or standalone with name None)."""
    return CrossFormer(
        embed_dim=model.embed_dim,
        depths=model.depths,
        num_heads=model.num_heads,
        group_size=model.group_size,
        interval=model.interval,
        version=model.version,
        features_only=True,
        mlp_ratio=model.mlp_ratio,
        drop_path_rate=model.drop_path_rate,
        patch_kernel_sizes=model.patch_kernel_sizes,
        merge_kernel_sizes=model.merge_kernel_sizes,
        remat=model.remat,
        dtype=model.dtype,
        name=name,
    )


# -------------------------------------------------------------------------------------------------
# Registry.

# Backbone group geometry of the released configs: Semantic FPN S and L used larger groups.
_GEOMETRY_7 = dict(group_size=(7, 7, 7, 7), interval=(8, 4, 2, 1))
_GEOMETRY_14 = dict(group_size=(14, 14, 7, 7), interval=(16, 8, 2, 1))

SEGMENTATION_VARIANTS: dict[str, dict[str, Any]] = {
    'upernet_crossformer_small': dict(head='upernet', backbone='crossformer_small', **_GEOMETRY_7),
    'upernet_crossformer_base': dict(head='upernet', backbone='crossformer_base', **_GEOMETRY_7),
    'upernet_crossformer_large': dict(head='upernet', backbone='crossformer_large', **_GEOMETRY_7),
    'upernet_crossformer_pp_small': dict(
        head='upernet', backbone='crossformer_pp_small', **_GEOMETRY_7
    ),
    'fpn_crossformer_small': dict(head='fpn', backbone='crossformer_small', **_GEOMETRY_14),
    'fpn_crossformer_base': dict(head='fpn', backbone='crossformer_base', **_GEOMETRY_7),
    'fpn_crossformer_large': dict(head='fpn', backbone='crossformer_large', **_GEOMETRY_14),
    'fpn_crossformer_pp_small': dict(head='fpn', backbone='crossformer_pp_small', **_GEOMETRY_7),
}

# Head widths of the released configs.
HEAD_DEFAULTS: dict[str, dict[str, Any]] = {
    'upernet': dict(head_channels=512, aux_channels=256, dropout_rate=0.1),
    'fpn': dict(head_channels=128, neck_channels=256, dropout_rate=0.1),
}

_OVERRIDABLE = {
    'upernet': {*DENSE_BACKBONE_FIELDS, 'head_channels', 'aux_channels', 'dropout_rate'},
    'fpn': {*DENSE_BACKBONE_FIELDS, 'head_channels', 'neck_channels', 'dropout_rate'},
}


def segmentation_config(name: str, num_classes: int = 150, **overrides) -> dict[str, Any]:
    """Constructor arguments of SegmentationModel for a registered name, overrides applied."""
    if name not in SEGMENTATION_VARIANTS:
        raise ValueError(
            f'unknown segmentation model {name!r}; available: '
            f'{", ".join(sorted(SEGMENTATION_VARIANTS))}'
        )
    variant = SEGMENTATION_VARIANTS[name]
    head = variant['head']
    kwargs = dense_model_config(
        name,
        num_classes,
        overrides,
        backbone=variant['backbone'],
        geometry={k: variant[k] for k in ('group_size', 'interval')},
        defaults={'head': head, **HEAD_DEFAULTS[head]},
        allowed=_OVERRIDABLE[head],
    )
    if head == 'fpn':
        kwargs['aux_channels'] = None
    normalize_backbone_fields(kwargs)
    return kwargs


def build_segmentation_model(name: str, num_classes: int = 150, **overrides) -> SegmentationModel:
    """A registered segmentation model (see SEGMENTATION_VARIANTS) as a Flax module."""
    if overrides.pop('features_only', False):
        raise ValueError(f'{name} is a segmentation model; features_only does not apply')
    return SegmentationModel(**segmentation_config(name, num_classes, **overrides))


for _name in SEGMENTATION_VARIANTS:
    register_model(_name, task='segmentation', num_classes=150, build=build_segmentation_model)
