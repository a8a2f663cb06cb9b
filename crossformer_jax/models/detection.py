"""Object detection on the CrossFormer backbone: RetinaNet (channels-last).

The MMDetection 2.x RetinaNet of the published COCO models, rebuilt in Flax:

- `neck`: an FPN on the backbone's stages 1..3 (strides 8, 16, 32): 1x1 lateral convolutions, a
  nearest-neighbour top-down sum, 3x3 output convolutions, and two extra levels from 3x3 stride-2
  convolutions (the first on the last backbone map, the second on the first extra level): five
  maps of `fpn_channels` at strides 8, 16, 32, 64, 128.
- `bbox_head`: the RetinaHead, shared by all levels: `num_head_convs` 3x3 conv + ReLU layers then
  `retina_cls` (A * K class logits per position, sigmoid) and, in a second tower, `retina_reg`
  (A * 4 box deltas), A anchors per position (`anchor_generator.num_anchors`), K classes.

Module and parameter names mirror the MMDetection state dicts (`cls_convs_0` is `cls_convs.0`, a
ConvModule's `conv`); docs/parameter_names.md lists the mapping.

    model = create_model('retinanet_crossformer_small')        # 80 classes (COCO)
    variables = model.init(rng, images)                        # {'params'}
    class_logits, box_deltas = model.apply(variables, images)  # 5 levels each, float32

images are (N, H, W, 3) with H and W multiples of 32. Level l's outputs are (N, H_l, W_l, A * K)
and (N, H_l, W_l, A * 4), channel a * K + k and a * 4 + j, so that a reshape to (N, H_l * W_l * A,
K) lists the anchors in (y, x, anchor) order, as the anchor generator does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from crossformer_jax.detection.anchors import AnchorGenerator
from crossformer_jax.models.crossformer import (
    DENSE_BACKBONE_FIELDS,
    check_layer_sizes,
    dense_model_config,
    normalize_backbone_fields,
)
from crossformer_jax.models.registry import register_model
from crossformer_jax.models.segmentation import resize_nearest, segmentation_backbone

FPN_START_LEVEL = 1  # the FPN reads backbone stages 1, 2, 3 (strides 8, 16, 32)
FPN_NUM_OUTPUTS = 5  # three from the backbone maps, two extra stride-2 levels
PYRAMID_STRIDES = (8, 16, 32, 64, 128)
PRIOR_PROBABILITY = 0.01  # retina_cls starts every class at this sigmoid score
HEAD_INIT_STD = 0.01


# -------------------------------------------------------------------------------------------------
# Layers.


class ConvLayer(nn.Module):
    """An MMDetection ConvModule without norm: a conv with bias (submodule 'conv'), optionally
    followed by ReLU; padding kernel // 2."""

    features: int
    kernel: int
    stride: int = 1
    relu: bool = False
    kernel_init: Callable[..., jax.Array] = nn.initializers.xavier_uniform()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (N, H, W, Cin) -> (N, ceil(H / stride), ceil(W / stride), features)."""
        pad = self.kernel // 2
        x = nn.Conv(
            self.features,
            (self.kernel, self.kernel),
            strides=(self.stride, self.stride),
            padding=((pad, pad), (pad, pad)),
            dtype=self.dtype,
            kernel_init=self.kernel_init,
            name='conv',
        )(x)
        return nn.relu(x) if self.relu else x


class FPN(nn.Module):
    """FPN neck: 1x1 laterals on backbone stages start_level..3, nearest top-down sum, 3x3 output
    convs, then extra levels up to num_outputs. With extra_convs (RetinaNet, add_extra_convs=
    'on_input'): fpn_convs_3 (stride 2) on the last backbone map, each further one (stride 2) on
    the previous output; without (Mask R-CNN): each extra level max-pools the previous output
    with kernel 1, stride 2. Xavier-uniform kernels, zero biases."""

    channels: int = 256
    dtype: Any = jnp.float32
    start_level: int = FPN_START_LEVEL
    num_outputs: int = FPN_NUM_OUTPUTS
    extra_convs: bool = True

    @nn.compact
    def __call__(self, features: Sequence[jax.Array]) -> list[jax.Array]:
        """4 backbone maps (N, H/4·2^-i, W/4·2^-i, C_i) -> num_outputs maps (N, H_l, W_l,
        channels), strides 2^(start_level + 2 + l) (H_l = ceil(H / stride)): by default 8, 16,
        32, 64, 128."""
        inputs = features[self.start_level :]
        laterals = [
            ConvLayer(self.channels, 1, dtype=self.dtype, name=f'lateral_convs_{i}')(x)
            for i, x in enumerate(inputs)
        ]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize_nearest(
                laterals[i], laterals[i - 1].shape[1:3]
            )
        outputs = [
            ConvLayer(self.channels, 3, dtype=self.dtype, name=f'fpn_convs_{i}')(lateral)
            for i, lateral in enumerate(laterals)
        ]
        if not self.extra_convs:  # F.max_pool2d(x, 1, stride=2): every other row and column
            while len(outputs) < self.num_outputs:
                outputs.append(outputs[-1][:, ::2, ::2])
            return outputs
        extra = inputs[-1]  # 'on_input': the first extra level reads the last backbone map
        for i in range(len(outputs), self.num_outputs):
            extra = ConvLayer(self.channels, 3, stride=2, dtype=self.dtype, name=f'fpn_convs_{i}')(
                extra
            )
            outputs.append(extra)
        return outputs


class RetinaHead(nn.Module):
    """RetinaNet's head, the same weights at every level: `num_convs` 3x3 conv + ReLU layers in a
    classification tower (cls_convs_i -> retina_cls) and a box tower (reg_convs_i -> retina_reg).
    Kernels ~ N(0, 0.01^2), biases 0 except retina_cls's, -log((1 - p) / p) with p = 0.01."""

    num_classes: int
    num_anchors: int
    channels: int = 256
    num_convs: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, levels: Sequence[jax.Array]
    ) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
        """Maps (N, H_l, W_l, C) -> (class logits (N, H_l, W_l, A*K), box deltas (N, H_l, W_l,
        A*4)) per level, in `dtype`."""
        init = nn.initializers.normal(HEAD_INIT_STD)

        def tower(prefix: str) -> list[ConvLayer]:
            return [
                ConvLayer(
                    self.channels,
                    3,
                    relu=True,
                    kernel_init=init,
                    dtype=self.dtype,
                    name=f'{prefix}_{i}',
                )
                for i in range(self.num_convs)
            ]

        cls_convs, reg_convs = tower('cls_convs'), tower('reg_convs')
        prior_bias = -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY)
        retina_cls = nn.Conv(
            self.num_anchors * self.num_classes,
            (3, 3),
            padding=((1, 1), (1, 1)),
            dtype=self.dtype,
            kernel_init=init,
            bias_init=nn.initializers.constant(prior_bias),
            name='retina_cls',
        )
        retina_reg = nn.Conv(
            self.num_anchors * 4,
            (3, 3),
            padding=((1, 1), (1, 1)),
            dtype=self.dtype,
            kernel_init=init,
            name='retina_reg',
        )
        class_logits, box_deltas = [], []
        for x in levels:
            cls_x, reg_x = x, x
            for cls_conv, reg_conv in zip(cls_convs, reg_convs):
                cls_x, reg_x = cls_conv(cls_x), reg_conv(reg_x)
            class_logits.append(retina_cls(cls_x))
            box_deltas.append(retina_reg(reg_x))
        return tuple(class_logits), tuple(box_deltas)


# -------------------------------------------------------------------------------------------------
# The whole model.


class RetinaNet(nn.Module):
    """CrossFormer backbone (`backbone`, features_only) + FPN (`neck`) + RetinaHead (`bbox_head`).

    __call__(images (N, H, W, 3), train=False) -> (class_logits, box_deltas): tuples of 5 levels
    (strides 8, 16, 32, 64, 128), (N, H_l, W_l, A*K) and (N, H_l, W_l, A*4) float32, A =
    anchor_generator.num_anchors, K = num_classes. `train` only switches the backbone's drop
    path. Parameters are float32; `dtype` is the compute dtype.
    """

    embed_dim: int
    depths: Sequence[int]
    num_heads: Sequence[int]
    group_size: Sequence[int]
    interval: Sequence[int]
    version: str = 'v1'
    num_classes: int = 80
    fpn_channels: int = 256
    head_channels: int = 256  # MMDetection's feat_channels
    num_head_convs: int = 4  # MMDetection's stacked_convs
    anchor_generator: AnchorGenerator = AnchorGenerator()
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    patch_kernel_sizes: Sequence[int] = (4, 8, 16, 32)
    merge_kernel_sizes: Sequence[int] = (2, 4)
    remat: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, images: jax.Array, train: bool = False
    ) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
        backbone = segmentation_backbone(self, name='backbone')
        backbone.check_images(images)
        features = backbone(images, train)
        levels = FPN(self.fpn_channels, self.dtype, name='neck')(features)
        class_logits, box_deltas = RetinaHead(
            self.num_classes,
            self.anchor_generator.num_anchors,
            self.head_channels,
            self.num_head_convs,
            self.dtype,
            name='bbox_head',
        )(levels)
        return (
            tuple(x.astype(jnp.float32) for x in class_logits),
            tuple(x.astype(jnp.float32) for x in box_deltas),
        )


# -------------------------------------------------------------------------------------------------
# Registry.

# Backbone group geometry of the released detection configs (all three).
_GEOMETRY = dict(group_size=(7, 7, 7, 7), interval=(8, 4, 2, 1))

DETECTION_VARIANTS: dict[str, dict[str, Any]] = {
    'retinanet_crossformer_small': dict(backbone='crossformer_small', **_GEOMETRY),
    'retinanet_crossformer_base': dict(backbone='crossformer_base', **_GEOMETRY),
    'retinanet_crossformer_pp_small': dict(backbone='crossformer_pp_small', **_GEOMETRY),
}

# Neck and head widths of the released configs.
HEAD_DEFAULTS: dict[str, Any] = dict(fpn_channels=256, head_channels=256, num_head_convs=4)

_OVERRIDABLE = {*DENSE_BACKBONE_FIELDS, *HEAD_DEFAULTS, 'anchor_generator'}


def check_anchor_generator(field: str, anchors: Any, strides: Sequence[int]) -> None:
    """ValueError naming `field` unless anchors is an AnchorGenerator over these pyramid
    strides."""
    if not isinstance(anchors, AnchorGenerator):
        raise ValueError(f'{field} must be an AnchorGenerator, got {anchors!r}')
    if tuple(anchors.strides) != tuple(strides):
        raise ValueError(
            f'{field}.strides must be the FPN strides {tuple(strides)}, got '
            f'{tuple(anchors.strides)}'
        )


def detection_config(name: str, num_classes: int = 80, **overrides) -> dict[str, Any]:
    """Constructor arguments of RetinaNet for a registered name, overrides applied."""
    if name not in DETECTION_VARIANTS:
        raise ValueError(
            f'unknown detection model {name!r}; available: {", ".join(sorted(DETECTION_VARIANTS))}'
        )
    variant = DETECTION_VARIANTS[name]
    kwargs = dense_model_config(
        name,
        num_classes,
        overrides,
        backbone=variant['backbone'],
        geometry={k: variant[k] for k in ('group_size', 'interval')},
        defaults={**HEAD_DEFAULTS, 'anchor_generator': AnchorGenerator()},
        allowed=_OVERRIDABLE,
    )
    check_anchor_generator('anchor_generator', kwargs['anchor_generator'], PYRAMID_STRIDES)
    check_layer_sizes(kwargs, ('fpn_channels', 'head_channels'), ('num_head_convs',))
    normalize_backbone_fields(kwargs)
    return kwargs


def build_detection_model(name: str, num_classes: int = 80, **overrides) -> RetinaNet:
    """A registered detection model (see DETECTION_VARIANTS) as a Flax module."""
    if overrides.pop('features_only', False):
        raise ValueError(f'{name} is a detection model; features_only does not apply')
    return RetinaNet(**detection_config(name, num_classes, **overrides))


for _name in DETECTION_VARIANTS:
    register_model(_name, task='detection', num_classes=80, build=build_detection_model)
