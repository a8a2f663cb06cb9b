"""CrossFormer and CrossFormer++ in Flax (channels-last).

A Cross-scale Embedding Layer (CEL) in front of every stage, blocks that alternate Short Distance
Attention (SDA) and Long Distance Attention (LDA) over groups of tokens, a Dynamic Position Bias
(DPB) MLP that turns relative offsets into attention biases, and for CrossFormer++ the Activation
Cooling Layer (ACL). Images are (N, H, W, 3); H and W must be multiples of 32. Parameter names
mirror the PyTorch state dict (see docs/parameter_names.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from crossformer_jax.models import ops
from crossformer_jax.models.registry import register_model

LAYER_NORM_EPS = 1e-5  # PyTorch's default; Flax's is 1e-6.
MASKED_LOGIT = (
    -1e6
)  # added to the logits of padded keys (finite, so all-padding groups stay finite)


def trunc_normal_init(stddev: float = 0.02):
    """Normal(0, stddev) cut at +-2 stddev (as PyTorch's trunc_normal_ in the original code)."""

    def init(key, shape, dtype=jnp.float32):
        return stddev * jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype)

    return init


def conv_kernel_init():
    """PyTorch's Conv2d default: Kaiming-uniform with a = sqrt(5), i.e. U(+-1/sqrt(fan_in))."""
    return nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def conv_bias_init(fan_in: int):
    """PyTorch's Conv2d default bias: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class LayerNorm(nn.Module):
    """PyTorch's LayerNorm over the last axis (eps 1e-5, parameters 'scale' and 'bias' as in
    nn.LayerNorm); statistics in float32, output in `dtype`."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param('scale', nn.initializers.ones, (x.shape[-1],), jnp.float32)
        bias = self.param('bias', nn.initializers.zeros, (x.shape[-1],), jnp.float32)
        x = ops.current().layer_norm(x.astype(jnp.float32), scale, bias, LAYER_NORM_EPS)
        return x.astype(self.dtype)


def layer_norm(name: str, dtype) -> LayerNorm:
    return LayerNorm(dtype=dtype, name=name)


class Dense(nn.Module):
    """A dense layer (params 'kernel' (Cin, Cout), 'bias' (Cout,)), nn.Dense's initialisation as
    in the original code (truncated normal, zero bias)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (..., Cin) -> (..., features), in dtype."""
        kernel = self.param('kernel', trunc_normal_init(), (x.shape[-1], self.features))
        bias = self.param('bias', nn.initializers.zeros, (self.features,))
        return ops.current().linear(
            x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
        )


def dense(features: int, name: str, dtype) -> Dense:
    return Dense(features, dtype=dtype, name=name)


def conv(
    features: int,
    kernel: int,
    stride: int,
    padding: int,
    in_features: int,
    name: str,
    dtype,
    groups: int = 1,
) -> nn.Conv:
    fan_in = in_features // groups * kernel * kernel
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        feature_group_count=groups,
        dtype=dtype,
        kernel_init=conv_kernel_init(),
        bias_init=conv_bias_init(fan_in),
        name=name,
    )


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU as x/2 * (1 + erf(x/sqrt 2)), PyTorch's formula."""
    return x * 0.5 * (1.0 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))


class EmbeddingConv(nn.Module):
    """One kernel of a cross-scale embedding: a convolution with stride s and kernel k, a multiple
    of s, padded by (k - s) / 2 on every side (parameters as nn.Conv: 'kernel' (k, k, Cin, out),
    'bias'), computed by `ops.current().strided_conv`."""

    features: int
    kernel: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (N, H, W, Cin), H and W multiples of the stride -> (N, H/s, W/s, features)."""
        k, c = self.kernel, x.shape[-1]
        kernel = self.param('kernel', conv_kernel_init(), (k, k, c, self.features), jnp.float32)
        bias = self.param('bias', conv_bias_init(k * k * c), (self.features,), jnp.float32)
        y = ops.current().strided_conv(
            x.astype(self.dtype), kernel.astype(self.dtype), self.stride, (k - self.stride) // 2
        )
        return y + bias.astype(self.dtype)


def cross_scale_channels(total: int, num_kernels: int) -> list[int]:
    """Channels of each CEL kernel: halves for all but the last kernel, e.g. 64 -> 32,16,8,8."""
    return [total // 2 ** (i + 1) for i in range(num_kernels - 1)] + [
        total // 2 ** (num_kernels - 1)
    ]


# -------------------------------------------------------------------------------------------------
# Grouping of tokens for SDA / LDA.


@dataclasses.dataclass(frozen=True)
class GroupLayout:
    """How an H x W token grid is cut into groups.

    group: (Gh, Gw) tokens of a group along each axis; interval: distance I between the members of
    a group in the grid (1 for SDA); padded: (Hp, Wp), the grid after bottom/right zero padding, a
    multiple of (Gh * I, Gw * I). A region of Gh*I x Gw*I tokens holds I*I groups.
    """

    group: tuple[int, int]
    interval: int
    padded: tuple[int, int]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def group_layout(
    height: int, width: int, *, group_size: int, interval: int, long_distance: bool, version: str
) -> GroupLayout:
    """The SDA/LDA grouping of one block on a height x width token grid (docs/architecture.md)."""
    if min(height, width) <= group_size:
        # Small maps: one SDA group size; v1 groups by the short side, ++ attends to the whole map.
        size = min(height, width) if version == 'v1' else max(height, width)
        return GroupLayout((size, size), 1, (_round_up(height, size), _round_up(width, size)))
    if not long_distance:
        return GroupLayout(
            (group_size, group_size),
            1,
            (_round_up(height, group_size), _round_up(width, group_size)),
        )
    if version == 'v1':
        # Fixed interval, groups growing with the image, one region (the dense-prediction rule).
        gh, gw = -(-height // interval), -(-width // interval)
        return GroupLayout((gh, gw), interval, (gh * interval, gw * interval))
    region = group_size * interval
    return GroupLayout(
        (group_size, group_size), interval, (_round_up(height, region), _round_up(width, region))
    )


def group_tokens(x: jax.Array, layout: GroupLayout) -> jax.Array:
    """(N, Hp, Wp, C) -> (N, groups, Gh*Gw, C), tokens row-major inside a group."""
    n, hp, wp, c = x.shape
    (gh, gw), i = layout.group, layout.interval
    rh, rw = hp // (gh * i), wp // (gw * i)
    # A padded row index is (region, member row, offset inside the interval): members are I apart.
    x = x.reshape(n, rh, gh, i, rw, gw, i, c).transpose(0, 1, 4, 3, 6, 2, 5, 7)
    return x.reshape(n, rh * rw * i * i, gh * gw, c)


def ungroup_tokens(x: jax.Array, layout: GroupLayout) -> jax.Array:
    """(N, groups, Gh*Gw, C) -> (N, Hp, Wp, C); the inverse of `group_tokens`."""
    n, _, _, c = x.shape
    (gh, gw), i = layout.group, layout.interval
    hp, wp = layout.padded
    rh, rw = hp // (gh * i), wp // (gw * i)
    x = x.reshape(n, rh, rw, i, i, gh, gw, c).transpose(0, 1, 5, 3, 2, 6, 4, 7)
    return x.reshape(n, hp, wp, c)


@functools.cache
def padding_key_bias(height: int, width: int, layout: GroupLayout) -> np.ndarray | None:
    """(groups, Gh*Gw) logit bias: MASKED_LOGIT on padded keys; None if nothing is padded."""
    hp, wp = layout.padded
    if (hp, wp) == (height, width):
        return None
    valid = np.zeros((1, hp, wp, 1), np.float32)
    valid[:, :height, :width] = 1.0
    grouped = np.asarray(group_tokens(valid, layout))[0, :, :, 0]  # (groups, Gh*Gw)
    return np.where(grouped > 0, 0.0, MASKED_LOGIT).astype(np.float32)


@functools.cache
def relative_offsets(gh: int, gw: int) -> tuple[np.ndarray, np.ndarray]:
    """DPB inputs and gather index for a Gh x Gw group.

    Returns offsets ((2Gh-1)*(2Gw-1), 2) float32, dh outer and dw inner, and index (T, T) int32 with
    T = Gh*Gw: row of the offset table for query p and key q.
    """
    dh, dw = np.meshgrid(np.arange(1 - gh, gh), np.arange(1 - gw, gw), indexing='ij')
    offsets = np.stack([dh.ravel(), dw.ravel()], axis=-1).astype(np.float32)
    coords = np.stack(np.meshgrid(np.arange(gh), np.arange(gw), indexing='ij'), -1).reshape(-1, 2)
    rel = coords[:, None, :] - coords[None, :, :]
    index = (rel[..., 0] + gh - 1) * (2 * gw - 1) + (rel[..., 1] + gw - 1)
    return offsets, index.astype(np.int32)


# -------------------------------------------------------------------------------------------------
# Modules.


class DynamicPositionBias(nn.Module):
    """DPB: an MLP from relative offsets (R, 2) to per-head biases (R, heads), in float32."""

    pos_dim: int
    num_heads: int

    @nn.compact
    def __call__(self, offsets: jax.Array) -> jax.Array:
        x = dense(self.pos_dim, 'pos_proj', jnp.float32)(offsets)
        for n, features in ((1, self.pos_dim), (2, self.pos_dim), (3, self.num_heads)):
            x = layer_norm(f'pos{n}_norm', jnp.float32)(x)
            x = dense(features, f'pos{n}_linear', jnp.float32)(nn.relu(x))
        return x


class GroupAttention(nn.Module):
    """Multi-head self-attention inside each group, with the dynamic position bias
    (`ops.current().group_attention`)."""

    dim: int
    num_heads: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, group: tuple[int, int], key_bias: np.ndarray | None, train: bool
    ) -> jax.Array:
        """x: (N, groups, T, C) with T = Gh*Gw -> (N, groups, T, C)."""
        n, g, t, c = x.shape
        qkv = dense(3 * self.dim, 'qkv', self.dtype)(x)  # (N, groups, T, 3, heads, hd) channels
        offsets, index = relative_offsets(*group)
        table = DynamicPositionBias((self.dim // 4) // 4, self.num_heads, name='pos')(offsets)
        position_bias = jnp.transpose(table[index], (2, 0, 1))  # (heads, T, T)
        keep = None
        if train and self.dropout_rate > 0.0:
            keep_rate = 1.0 - self.dropout_rate
            shape = (n * g, self.num_heads, t, t)
            keep = jax.random.bernoulli(self.make_rng('dropout'), keep_rate, shape) / keep_rate
        out = (
            ops.current()
            .group_attention(
                qkv.reshape(n * g, t, 3 * c), position_bias, key_bias, keep, self.num_heads
            )
            .reshape(n, g, t, c)
        )
        out = dense(self.dim, 'proj', self.dtype)(out)
        return nn.Dropout(self.dropout_rate)(out, deterministic=not train)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    dim: int
    hidden_dim: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = gelu(dense(self.hidden_dim, 'fc1', self.dtype)(x))
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        x = dense(self.dim, 'fc2', self.dtype)(x)
        return nn.Dropout(self.dropout_rate)(x, deterministic=not train)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample in training mode."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(
            self.make_rng('dropout'), keep, (x.shape[0],) + (1,) * (x.ndim - 1)
        )
        return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


class CrossFormerBlock(nn.Module):
    """norm1 -> group -> attention -> ungroup (+res), norm2 -> MLP (+res), optional ACL."""

    dim: int
    num_heads: int
    group_size: int
    interval: int
    long_distance: bool
    version: str
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    dropout_rate: float = 0.0
    activation_cooling: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: (N, H, W, C) -> (N, H, W, C)."""
        _n, h, w, _c = x.shape
        layout = group_layout(
            h,
            w,
            group_size=self.group_size,
            interval=self.interval,
            long_distance=self.long_distance,
            version=self.version,
        )
        hp, wp = layout.padded
        y = layer_norm('norm1', self.dtype)(x)
        y = jnp.pad(y, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
        y = GroupAttention(self.dim, self.num_heads, self.dropout_rate, self.dtype, name='attn')(
            group_tokens(y, layout), layout.group, padding_key_bias(h, w, layout), train
        )
        y = ungroup_tokens(y, layout)[:, :h, :w]
        x = x + DropPath(self.drop_path)(y, train)
        y = Mlp(
            self.dim, int(self.dim * self.mlp_ratio), self.dropout_rate, self.dtype, name='mlp'
        )(layer_norm('norm2', self.dtype)(x), train)
        x = x + DropPath(self.drop_path)(y, train)
        if self.activation_cooling:
            x = conv(self.dim, 3, 1, 1, self.dim, 'ex_conv', self.dtype, groups=self.dim)(x)
            x = layer_norm('ex_ln', self.dtype)(x)
        return x


class CrossScaleEmbedding(nn.Module):
    """CEL: convolutions of several kernel sizes with one stride, concatenated along channels.

    Used as the first embedding (norm after the convolutions, stride 4) and as the merge between
    stages (norm before, stride 2). Each kernel k pads (k - stride) / 2, so all outputs align.
    """

    out_dim: int
    kernel_sizes: Sequence[int]
    stride: int
    norm_first: bool
    conv_name: str  # 'projs' for the first embedding, 'reductions' for merges (state-dict names)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (N, H, W, Cin) -> (N, H/stride, W/stride, out_dim)."""
        if self.norm_first:
            x = layer_norm('norm', self.dtype)(x)
        channels = cross_scale_channels(self.out_dim, len(self.kernel_sizes))
        x = jnp.concatenate(
            [
                EmbeddingConv(ch, k, self.stride, self.dtype, name=f'{self.conv_name}_{i}')(x)
                for i, (k, ch) in enumerate(zip(self.kernel_sizes, channels))
            ],
            axis=-1,
        )
        if not self.norm_first:
            x = layer_norm('norm', self.dtype)(x)
        return x


class CrossFormerStage(nn.Module):
    """`depth` blocks (SDA at even, LDA at odd positions), then an optional CEL merge.

    Returns (the last block's output (N, H, W, C), the merged map (N, H/2, W/2, 2C) or None).
    """

    dim: int
    depth: int
    num_heads: int
    group_size: int
    interval: int
    version: str
    drop_path: Sequence[float]
    merge: bool
    mlp_ratio: float = 4.0
    dropout_rate: float = 0.0
    merge_kernel_sizes: Sequence[int] = (2, 4)
    remat: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array | None]:
        block = nn.remat(CrossFormerBlock, static_argnums=(2,)) if self.remat else CrossFormerBlock
        for j in range(self.depth):
            x = block(
                self.dim,
                self.num_heads,
                self.group_size,
                self.interval,
                long_distance=j % 2 == 1,
                version=self.version,
                mlp_ratio=self.mlp_ratio,
                drop_path=self.drop_path[j],
                dropout_rate=self.dropout_rate,
                activation_cooling=(
                    self.version == 'pp' and (j + 1) % 3 == 0 and j < self.depth - 1
                ),
                dtype=self.dtype,
                name=f'blocks_{j}',
            )(x, train)
        if not self.merge:
            return x, None
        if x.shape[1] % 2 or x.shape[2] % 2:
            raise ValueError(f'a CEL merge needs an even token grid, got {x.shape[1]}x{x.shape[2]}')
        merged = CrossScaleEmbedding(
            2 * self.dim,
            self.merge_kernel_sizes,
            2,
            norm_first=True,
            conv_name='reductions',
            dtype=self.dtype,
            name='downsample',
        )(x)
        return x, merged


class CrossFormer(nn.Module):
    """CrossFormer (version 'v1') / CrossFormer++ (version 'pp').

    __call__(images (N, H, W, 3), train) -> logits (N, num_classes) float32; with num_classes=0
    the pooled, normed features (N, 8C) float32 instead (no head). With features_only, the stage
    maps selected by out_indices (all four by default) of [(N, H/4, W/4, C), (N, H/8, W/8, 2C),
    (N, H/16, W/16, 4C), (N, H/32, W/32, 8C)], C = embed_dim. return_features=True gives both:
    (logits or pooled features, the four stage maps). Parameters are float32; `dtype` is the
    compute dtype.
    """

    embed_dim: int
    depths: Sequence[int]
    num_heads: Sequence[int]
    group_size: Sequence[int]
    interval: Sequence[int]
    version: str = 'v1'
    num_classes: int = 1000
    features_only: bool = False
    out_indices: Sequence[int] = (0, 1, 2, 3)  # stages returned with features_only
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    dropout_rate: float = 0.0
    patch_kernel_sizes: Sequence[int] = (4, 8, 16, 32)
    merge_kernel_sizes: Sequence[int] = (2, 4)
    remat: bool = False
    dtype: Any = jnp.float32

    def check_images(self, images: jax.Array) -> None:
        """Raises ValueError unless images is (N, H, W, 3) with H and W multiples of 32."""
        if images.ndim != 4:
            raise ValueError(
                f'expected images of rank 4 (N, H, W, 3), got shape {tuple(images.shape)}'
            )
        _n, h, w, c = images.shape
        if c != 3:
            raise ValueError(
                f'expected 3 channels last (N, H, W, 3), got {c} channels in shape '
                f'{tuple(images.shape)}'
            )
        if h % 32 or w % 32 or h == 0 or w == 0:
            raise ValueError(
                f'expected height and width that are positive multiples of 32, got {h}x{w}'
            )

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False, return_features: bool = False):
        if return_features and self.features_only:
            raise ValueError('return_features needs a classifier (features_only=False)')
        self.check_images(images)
        x = CrossScaleEmbedding(
            self.embed_dim,
            self.patch_kernel_sizes,
            self.patch_kernel_sizes[0],
            norm_first=False,
            conv_name='projs',
            dtype=self.dtype,
            name='patch_embed',
        )(images.astype(self.dtype))
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
        features = []
        for s, depth in enumerate(self.depths):
            first = sum(self.depths[:s])
            out, merged = CrossFormerStage(
                self.embed_dim * 2**s,
                depth,
                self.num_heads[s],
                self.group_size[s],
                self.interval[s],
                self.version,
                tuple(rates[first : first + depth]),
                merge=s < len(self.depths) - 1,
                mlp_ratio=self.mlp_ratio,
                dropout_rate=self.dropout_rate,
                merge_kernel_sizes=self.merge_kernel_sizes,
                remat=self.remat,
                dtype=self.dtype,
                name=f'layers_{s}',
            )(x, train)
            features.append(out)
            x = merged
        if self.features_only:
            return [features[i] for i in self.out_indices]
        x = layer_norm('norm', self.dtype)(features[-1])
        x = jnp.mean(x, axis=(1, 2))
        if self.num_classes > 0:
            x = dense(self.num_classes, 'head', self.dtype)(x)
        x = x.astype(jnp.float32)
        return (x, features) if return_features else x


_MODEL_FIELDS = {f.name for f in dataclasses.fields(CrossFormer)} - {'parent', 'name'}

# The constructor fields that define the backbone's architecture (and so its parameter shapes);
# the other fields (drop_path_rate, dtype, remat, ...) are training or runtime choices.
ARCHITECTURE_FIELDS = (
    'embed_dim',
    'depths',
    'num_heads',
    'group_size',
    'interval',
    'version',
    'mlp_ratio',
    'patch_kernel_sizes',
    'merge_kernel_sizes',
)


# The backbone fields a dense-prediction model (segmentation, detection) may override.
DENSE_BACKBONE_FIELDS = (*ARCHITECTURE_FIELDS, 'drop_path_rate', 'remat', 'dtype')


def dense_model_config(
    name: str,
    num_classes: int,
    overrides: dict[str, Any],
    *,
    backbone: str,
    geometry: dict[str, Any],
    defaults: dict[str, Any],
    allowed: Iterable[str],
) -> dict[str, Any]:
    """Constructor arguments of a dense-prediction model registered as `name` on the variant
    `backbone`: its embed_dim, depths, heads, version and drop path, the released `geometry`
    (group_size, interval), the heads' `defaults`, num_classes, then `overrides` (ValueError
    naming any not in `allowed`, or a num_classes that is not a positive integer). The caller
    checks its own fields, then calls normalize_backbone_fields."""
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f'unknown override(s) {unknown} for {name}; allowed: {sorted(allowed)}')
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f'num_classes must be a positive integer, got {num_classes!r}')
    variant = VARIANTS[backbone]
    return {
        **{k: variant[k] for k in ('embed_dim', 'depths', 'num_heads', 'version')},
        'drop_path_rate': variant['drop_path_rate'],
        **geometry,
        **defaults,
        'num_classes': num_classes,
        **overrides,
    }


def check_layer_sizes(kwargs: dict[str, Any], widths: Iterable[str], counts: Iterable[str] = ()):
    """ValueError naming the first of kwargs' `widths` that is not an integer >= 1 or `counts`
    (numbers of layers) that is not an integer >= 0."""
    for fields, smallest in ((widths, 1), (counts, 0)):
        for field in fields:
            value = kwargs[field]
            if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
                raise ValueError(f'{field} must be an integer >= {smallest}, got {value!r}')


def normalize_backbone_fields(kwargs: dict) -> None:
    """Checks the backbone fields of constructor kwargs in place: version, four per-stage tuples,
    a dtype given by name. Raises ValueError naming the field."""
    if kwargs['version'] not in ('v1', 'pp'):
        raise ValueError(f"version must be 'v1' or 'pp', got {kwargs['version']!r}")
    for field in ('depths', 'num_heads', 'group_size', 'interval'):
        kwargs[field] = tuple(kwargs[field])
        if len(kwargs[field]) != 4:
            raise ValueError(f'{field} must have 4 entries (one per stage), got {kwargs[field]}')
    if isinstance(kwargs.get('dtype'), str):
        kwargs['dtype'] = jnp.dtype(kwargs['dtype'])


def stage_indices(out_indices: Sequence[int], features_only: bool) -> tuple[int, ...]:
    """out_indices as non-negative stage numbers (-1 is the last stage); ValueError when an index
    is out of range, repeated, or given without features_only."""
    if not features_only:
        raise ValueError('out_indices selects feature maps and needs features_only=True')
    indices = []
    for index in out_indices:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise ValueError(f'out_indices must be integers, got {index!r} in {out_indices}')
        if not -4 <= index < 4:
            raise ValueError(f'out_indices entry {index} is out of range for 4 stages (-4..3)')
        indices.append(int(index) % 4)
    if not indices or len(set(indices)) != len(indices):
        raise ValueError(f'out_indices must name distinct stages, got {tuple(out_indices)}')
    return tuple(indices)


# -------------------------------------------------------------------------------------------------
# Registry.

_V1 = dict(group_size=(7, 7, 7, 7), interval=(8, 4, 2, 1), version='v1')
_PP = dict(group_size=(4, 4, 14, 7), interval=(4, 2, 1, 1), version='pp')

VARIANTS: dict[str, dict[str, Any]] = {
    'crossformer_tiny': dict(
        embed_dim=64, depths=(1, 1, 8, 6), num_heads=(2, 4, 8, 16), drop_path_rate=0.1, **_V1
    ),
    'crossformer_small': dict(
        embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2, **_V1
    ),
    'crossformer_base': dict(
        embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3, **_V1
    ),
    'crossformer_large': dict(
        embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5, **_V1
    ),
    'crossformer_pp_small': dict(
        embed_dim=64, depths=(2, 2, 18, 2), num_heads=(2, 4, 8, 16), drop_path_rate=0.2, **_PP
    ),
    'crossformer_pp_base': dict(
        embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3, **_PP
    ),
    'crossformer_pp_large': dict(
        embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5, **_PP
    ),
    'crossformer_pp_huge': dict(
        embed_dim=128, depths=(6, 6, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5, **_PP
    ),
}


def model_config(
    name: str, num_classes: int = 1000, features_only: bool = False, **overrides
) -> dict[str, Any]:
    """The constructor arguments of a registered variant, with overrides applied."""
    if name not in VARIANTS:
        raise ValueError(f'unknown classifier {name!r}; available: {", ".join(sorted(VARIANTS))}')
    unknown = sorted(set(overrides) - _MODEL_FIELDS)
    if unknown:
        raise ValueError(
            f'unknown override(s) {unknown} for {name}; allowed: {sorted(_MODEL_FIELDS)}'
        )
    kwargs = {
        **VARIANTS[name],
        'num_classes': num_classes,
        'features_only': features_only,
        **overrides,
    }
    normalize_backbone_fields(kwargs)
    if kwargs['num_classes'] < 0:
        raise ValueError(f'num_classes must be >= 0 (0: no head), got {kwargs["num_classes"]}')
    if 'out_indices' in kwargs:
        kwargs['out_indices'] = stage_indices(kwargs['out_indices'], features_only)
    return kwargs


def build_classifier(name: str, num_classes: int = 1000, features_only: bool = False, **overrides):
    """A classifier variant (or its backbone, features_only) as a Flax module."""
    return CrossFormer(**model_config(name, num_classes, features_only, **overrides))


for _name in VARIANTS:
    register_model(_name, task='classification', num_classes=1000, build=build_classifier)
