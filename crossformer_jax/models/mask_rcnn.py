"""Instance segmentation on the CrossFormer backbone: Mask R-CNN and Cascade Mask R-CNN
(channels-last).

The MMDetection 2.x networks of the published COCO models, rebuilt in Flax (the raw outputs only;
proposals, sampling, losses and post-processing live elsewhere):

- `neck`: an FPN on all four backbone stages (strides 4, 8, 16, 32), 1x1 lateral convolutions, a
  nearest-neighbour top-down sum and 3x3 output convolutions, plus a fifth level that max-pools
  the fourth (kernel 1, stride 2): five maps of `fpn_channels` at strides 4, 8, 16, 32, 64.
- `rpn_head`: a 3x3 conv + ReLU (`rpn_conv`) shared by the levels, then `rpn_cls` (A objectness
  logits per position, sigmoid) and `rpn_reg` (A * 4 box deltas), A = 3 anchors (scale 8,
  ratios 0.5, 1, 2).
- `roi_head`: RoI features by RoIAlign on the first four levels (7 x 7 for boxes, 14 x 14 for
  masks, level floor(log2(sqrt(area) / 56)) clamped to 0..3), then
  - `bbox_head`: `num_box_convs` 3x3 conv + BatchNorm + ReLU layers (`shared_convs_i`, Cascade
    only), `num_box_fcs` Linear + ReLU layers (`shared_fcs_i`), `fc_cls` (K + 1 logits, softmax,
    background last) and `fc_reg` (K * 4 class-specific deltas);
  - `mask_head`: `num_mask_convs` 3x3 conv + ReLU layers (`convs_i`), a 2x2 stride-2 transposed
    convolution + ReLU (`upsample`) and a 1x1 conv (`conv_logits`) to K class-specific 28 x 28
    mask logits.
  Cascade Mask R-CNN has three stages of each, `bbox_head_{0,1,2}` and `mask_head_{0,1,2}`.

The RoI features (R, 7, 7, C) reach `shared_fcs_0` flattened channel-major, (C, 7, 7), as PyTorch
flattens them, so that its kernel is the PyTorch Linear weight transposed and conversion stays a
plain transpose. Module and parameter names mirror the MMDetection state dicts (`shared_fcs_0`
is `shared_fcs.0`, `bbox_head_1` is `bbox_head.1`); docs/parameter_names.md lists the mapping.

    model = create_model('mask_rcnn_crossformer_small')              # 80 classes (COCO)
    variables = model.init(rng, images)                              # {'params'} (+ batch_stats)
    levels = model.apply(variables, images, method='features')       # 5 maps
    objectness, deltas = model.apply(variables, levels, method='rpn')
    class_logits, box_deltas = model.apply(variables, levels, rois, method='box_head')
    mask_logits = model.apply(variables, levels, rois, method='mask_head')

images are (N, H, W, 3) with H and W multiples of 32; rois (N, R, 4) are (x1, y1, x2, y2) in
input pixels. A Cascade model's methods take `stage` (0, 1, 2) and `train` (BatchNorm of its box
heads: batch statistics, and the 'batch_stats' collection mutable).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from crossformer_jax.detection.anchors import AnchorGenerator
from crossformer_jax.detection.roi_align import EXACT_EXTENT, multilevel_roi_align
from crossformer_jax.models.crossformer import (
    DENSE_BACKBONE_FIELDS,
    check_layer_sizes,
    dense_model_config,
    normalize_backbone_fields,
)
from crossformer_jax.models.detection import FPN, ConvLayer, check_anchor_generator
from crossformer_jax.models.registry import register_model
from crossformer_jax.models.segmentation import ConvModule, segmentation_backbone

PYRAMID_STRIDES = (4, 8, 16, 32, 64)  # the FPN's five levels
ROI_STRIDES = (4, 8, 16, 32)  # the levels RoIAlign reads
FINEST_SCALE = 56.0  # RoIs of sqrt(area) < 2 * 56 pool from the stride-4 level
BOX_ROI_SIZE = 7
MASK_ROI_SIZE = 14  # the mask logits come at twice this size
NUM_CASCADE_STAGES = 3

# The RPN's anchors: 3 per position, side 8 * stride, aspect ratios (h / w) 0.5, 1, 2.
RPN_ANCHOR_GENERATOR = AnchorGenerator(
    strides=PYRAMID_STRIDES, octave_base_scale=8.0, scales_per_octave=1, ratios=(0.5, 1.0, 2.0)
)

# MMDetection's default initialisations of the heads.
RPN_INIT_STD = 0.01
CLASSIFIER_INIT_STD = 0.01
REGRESSOR_INIT_STD = 0.001
KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


# -------------------------------------------------------------------------------------------------
# Heads.


class RPNHead(nn.Module):
    """The region proposal head, the same weights at every level: rpn_conv (3x3) + ReLU, then
    rpn_cls (1x1, A logits) and rpn_reg (1x1, A * 4 deltas). Kernels ~ N(0, 0.01^2), zero
    biases."""

    num_anchors: int
    channels: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, levels: Sequence[jax.Array]
    ) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
        """Maps (N, H_l, W_l, C) -> (objectness logits (N, H_l, W_l, A), box deltas (N, H_l,
        W_l, A * 4), channel a * 4 + j) per level, in `dtype`."""
        init = nn.initializers.normal(RPN_INIT_STD)
        rpn_conv = nn.Conv(
            self.channels,
            (3, 3),
            padding=((1, 1), (1, 1)),
            dtype=self.dtype,
            kernel_init=init,
            name='rpn_conv',
        )
        rpn_cls = nn.Conv(
            self.num_anchors, (1, 1), dtype=self.dtype, kernel_init=init, name='rpn_cls'
        )
        rpn_reg = nn.Conv(
            self.num_anchors * 4, (1, 1), dtype=self.dtype, kernel_init=init, name='rpn_reg'
        )
        objectness, deltas = [], []
        for x in levels:
            x = nn.relu(rpn_conv(x))
            objectness.append(rpn_cls(x))
            deltas.append(rpn_reg(x))
        return tuple(objectness), tuple(deltas)


class BoxHead(nn.Module):
    """MMDetection's ConvFCBBoxHead with shared layers only: `num_convs` ConvModules (3x3 conv
    without bias, BatchNorm, ReLU; Kaiming fan-out kernels), `num_fcs` Linear + ReLU layers
    (Xavier uniform), then fc_cls (K + 1, kernels ~ N(0, 0.01^2)) and fc_reg (K * 4, class k's
    deltas at 4k..4k+3; ~ N(0, 0.001^2)). Zero biases."""

    num_classes: int
    num_convs: int = 0
    num_fcs: int = 2
    conv_channels: int = 256
    fc_channels: int = 1024
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        """RoI features (B, R, S, S, C) -> (class logits (B, R, K + 1), box deltas (B, R, K * 4))
        in `dtype`. With convs and train=True the BatchNorm statistics are those of all B * R
        RoIs."""
        batch, rois = features.shape[:2]
        x = features.reshape(batch * rois, *features.shape[2:])
        for i in range(self.num_convs):
            x = ConvModule(self.conv_channels, 3, dtype=self.dtype, name=f'shared_convs_{i}')(
                x, train
            )
        # Channel-major (C, S, S), as PyTorch flattens the (C, S, S) RoI features.
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(batch, rois, -1)
        for i in range(self.num_fcs):
            x = nn.relu(
                nn.Dense(
                    self.fc_channels,
                    dtype=self.dtype,
                    kernel_init=nn.initializers.xavier_uniform(),
                    name=f'shared_fcs_{i}',
                )(x)
            )
        class_logits = nn.Dense(
            self.num_classes + 1,
            dtype=self.dtype,
            kernel_init=nn.initializers.normal(CLASSIFIER_INIT_STD),
            name='fc_cls',
        )(x)
        box_deltas = nn.Dense(
            self.num_classes * 4,
            dtype=self.dtype,
            kernel_init=nn.initializers.normal(REGRESSOR_INIT_STD),
            name='fc_reg',
        )(x)
        return class_logits, box_deltas


class Upsample2x(nn.Module):
    """A 2x2 stride-2 transposed convolution with bias (PyTorch's ConvTranspose2d(in, out, 2,
    stride=2)). Its four taps never overlap, so each output pixel (2i + a, 2j + b) is input
    pixel (i, j) times tap (a, b): one matmul and an interleave (XLA:CPU's transposed-convolution
    gradient is ~10x slower). kernel (2, 2, out, in): PyTorch's weight (in, out, 2, 2) transposed
    as any conv weight is; Kaiming normal over PyTorch's fan-out (in * 4); bias zero."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(N, H, W, C) -> (N, 2H, 2W, features) in `dtype`."""
        kernel = self.param('kernel', KAIMING_FAN_OUT, (2, 2, self.features, x.shape[-1]))
        bias = self.param('bias', nn.initializers.zeros, (self.features,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        n, h, w, _ = x.shape
        y = jnp.einsum('nijc,aboc->niajbo', x, kernel)
        return y.reshape(n, 2 * h, 2 * w, self.features) + bias


class MaskHead(nn.Module):
    """MMDetection's FCNMaskHead: `num_convs` 3x3 conv + ReLU layers (convs_i, with bias), a 2x2
    stride-2 transposed conv + ReLU (upsample: Upsample2x) and a 1x1 conv to K logits
    (conv_logits). All kernels Kaiming normal, fan-out, zero biases."""

    num_classes: int
    num_convs: int = 4
    channels: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        """RoI features (B, R, S, S, C) -> mask logits (B, R, 2S, 2S, K) in `dtype`."""
        batch, rois = features.shape[:2]
        x = features.reshape(batch * rois, *features.shape[2:])
        for i in range(self.num_convs):
            x = ConvLayer(
                self.channels,
                3,
                relu=True,
                kernel_init=KAIMING_FAN_OUT,
                dtype=self.dtype,
                name=f'convs_{i}',
            )(x)
        x = Upsample2x(self.channels, dtype=self.dtype, name='upsample')(x)
        x = nn.Conv(
            self.num_classes,
            (1, 1),
            dtype=self.dtype,
            kernel_init=KAIMING_FAN_OUT,
            name='conv_logits',
        )(nn.relu(x))
        return x.reshape(batch, rois, *x.shape[1:])


class RoIHead(nn.Module):
    """The box and mask heads: `bbox_head` and `mask_head`, or with cascade `bbox_head_{s}` and
    `mask_head_{s}` for s < NUM_CASCADE_STAGES. Takes RoI features, not RoIs."""

    num_classes: int
    cascade: bool = False
    num_box_convs: int = 0
    num_box_fcs: int = 2
    box_conv_channels: int = 256
    box_fc_channels: int = 1024
    num_mask_convs: int = 4
    mask_channels: int = 256
    dtype: Any = jnp.float32

    @property
    def num_stages(self) -> int:
        return NUM_CASCADE_STAGES if self.cascade else 1

    def setup(self):
        def box_head() -> BoxHead:
            return BoxHead(
                self.num_classes,
                self.num_box_convs,
                self.num_box_fcs,
                self.box_conv_channels,
                self.box_fc_channels,
                self.dtype,
            )

        def mask_head() -> MaskHead:
            return MaskHead(self.num_classes, self.num_mask_convs, self.mask_channels, self.dtype)

        # A list assigned in setup names its modules bbox_head_0, bbox_head_1, ...
        if self.cascade:
            self.bbox_head = [box_head() for _ in range(NUM_CASCADE_STAGES)]
            self.mask_head = [mask_head() for _ in range(NUM_CASCADE_STAGES)]
        else:
            self.bbox_head = box_head()
            self.mask_head = mask_head()

    def check_stage(self, stage: int) -> None:
        """ValueError unless stage is an integer in [0, num_stages)."""
        if (
            isinstance(stage, bool)
            or not isinstance(stage, int)
            or not 0 <= stage < self.num_stages
        ):
            raise ValueError(
                f'stage must be an integer in [0, {self.num_stages}) for a '
                f'{"cascade " if self.cascade else ""}RoI head, got {stage!r}'
            )

    def boxes(self, features: jax.Array, stage: int, train: bool) -> tuple[jax.Array, jax.Array]:
        """(B, R, 7, 7, C) -> (class logits (B, R, K + 1), box deltas (B, R, K * 4))."""
        self.check_stage(stage)
        head = self.bbox_head[stage] if self.cascade else self.bbox_head
        return head(features, train)

    def masks(self, features: jax.Array, stage: int) -> jax.Array:
        """(B, R, 14, 14, C) -> mask logits (B, R, 28, 28, K)."""
        self.check_stage(stage)
        head = self.mask_head[stage] if self.cascade else self.mask_head
        return head(features)


def roi_features(
    levels: Sequence[jax.Array], rois: jax.Array, size: int, exact_extent: int = EXACT_EXTENT
) -> jax.Array:
    """RoIAlign (aligned, adaptive sampling) of rois (B, R, 4) xyxy input pixels on the first four
    FPN levels, each RoI on its level -> (B, R, size, size, C); exact for RoIs whose long side
    spans at most `exact_extent` map pixels (detection.roi_align); ValueError for RoIs of another
    shape or batch."""
    return multilevel_roi_align(
        levels[: len(ROI_STRIDES)],
        rois,
        output_size=size,
        strides=ROI_STRIDES,
        finest_scale=FINEST_SCALE,
        sampling_ratio=0,
        aligned=True,
        max_samples=math.ceil(exact_extent / size),
    )


# -------------------------------------------------------------------------------------------------
# The whole model.


class MaskRCNN(nn.Module):
    """CrossFormer backbone (`backbone`, features_only) + FPN (`neck`) + RPN head (`rpn_head`) +
    box and mask heads (`roi_head`), one stage or, with cascade, three.

    Methods (call with `model.apply(variables, ..., method='name')`), outputs float32:
    - features(images (N, H, W, 3), train=False) -> 5 FPN maps (N, H_l, W_l, fpn_channels),
      strides 4, 8, 16, 32, 64 (`train` switches the backbone's drop path);
    - rpn(levels) -> (objectness (N, H_l, W_l, A), deltas (N, H_l, W_l, A * 4)) per level;
    - box_head(levels, rois (N, R, 4), stage=0, train=False) -> (class logits (N, R, K + 1),
      box deltas (N, R, K * 4));
    - mask_head(levels, rois, stage=0, train=False) -> mask logits (N, R, 28, 28, K);
    - __call__(images, rois=None, train=False): all of them, every stage (what init creates the
      variables with): {'objectness', 'rpn_deltas', 'class_logits', 'box_deltas',
      'mask_logits'}, the last three tuples over the stages; rois default to one RoI per image
      covering it.
    A = rpn_anchor_generator.num_anchors, K = num_classes. Parameters (and the cascade box heads'
    batch_stats) are float32; `dtype` is the compute dtype.
    """

    embed_dim: int
    depths: Sequence[int]
    num_heads: Sequence[int]
    group_size: Sequence[int]
    interval: Sequence[int]
    version: str = 'v1'
    num_classes: int = 80
    cascade: bool = False
    fpn_channels: int = 256
    rpn_channels: int = 256  # MMDetection's RPNHead feat_channels
    num_box_convs: int = 0
    num_box_fcs: int = 2
    box_conv_channels: int = 256
    box_fc_channels: int = 1024
    num_mask_convs: int = 4
    mask_channels: int = 256
    rpn_anchor_generator: AnchorGenerator = RPN_ANCHOR_GENERATOR
    # RoIAlign pools RoIs exactly up to this long side (half of it short side), in map pixels;
    # larger ones with fewer samples (detection.roi_align).
    roi_exact_extent: int = EXACT_EXTENT
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    patch_kernel_sizes: Sequence[int] = (4, 8, 16, 32)
    merge_kernel_sizes: Sequence[int] = (2, 4)
    remat: bool = False
    dtype: Any = jnp.float32

    def setup(self):
        self.backbone = segmentation_backbone(self)
        self.neck = FPN(
            self.fpn_channels,
            self.dtype,
            start_level=0,
            num_outputs=len(PYRAMID_STRIDES),
            extra_convs=False,
        )
        self.rpn_head = RPNHead(
            self.rpn_anchor_generator.num_anchors, self.rpn_channels, self.dtype
        )
        self.roi_head = RoIHead(
            self.num_classes,
            self.cascade,
            self.num_box_convs,
            self.num_box_fcs,
            self.box_conv_channels,
            self.box_fc_channels,
            self.num_mask_convs,
            self.mask_channels,
            self.dtype,
        )

    @property
    def num_stages(self) -> int:
        """The R-CNN stages: 3 for a cascade, else 1."""
        return NUM_CASCADE_STAGES if self.cascade else 1

    def features(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
        self.backbone.check_images(images)
        return tuple(self.neck(self.backbone(images, train)))

    def rpn(
        self, levels: Sequence[jax.Array]
    ) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
        objectness, deltas = self.rpn_head(levels)
        return (
            tuple(x.astype(jnp.float32) for x in objectness),
            tuple(x.astype(jnp.float32) for x in deltas),
        )

    def box_head(
        self, levels: Sequence[jax.Array], rois: jax.Array, stage: int = 0, train: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        features = roi_features(levels, rois, BOX_ROI_SIZE, self.roi_exact_extent)
        class_logits, box_deltas = self.roi_head.boxes(features, stage, train)
        return class_logits.astype(jnp.float32), box_deltas.astype(jnp.float32)

    def mask_head(
        self, levels: Sequence[jax.Array], rois: jax.Array, stage: int = 0, train: bool = False
    ) -> jax.Array:
        """`train` is accepted for symmetry with box_head: the mask head has no BatchNorm."""
        del train
        features = roi_features(levels, rois, MASK_ROI_SIZE, self.roi_exact_extent)
        return self.roi_head.masks(features, stage).astype(jnp.float32)

    def __call__(
        self, images: jax.Array, rois: jax.Array | None = None, train: bool = False
    ) -> dict[str, tuple[jax.Array, ...]]:
        levels = self.features(images, train)
        objectness, rpn_deltas = self.rpn(levels)
        if rois is None:
            n, h, w, _ = images.shape
            rois = jnp.broadcast_to(jnp.asarray([0.0, 0.0, w, h], jnp.float32), (n, 1, 4))
        stages = range(self.roi_head.num_stages)
        boxes = [self.box_head(levels, rois, s, train) for s in stages]
        return {
            'objectness': objectness,
            'rpn_deltas': rpn_deltas,
            'class_logits': tuple(logits for logits, _ in boxes),
            'box_deltas': tuple(deltas for _, deltas in boxes),
            'mask_logits': tuple(self.mask_head(levels, rois, s) for s in stages),
        }


# -------------------------------------------------------------------------------------------------
# Registry.

# Backbone group geometry of the released configs (all four).
_GEOMETRY = dict(group_size=(7, 7, 7, 7), interval=(8, 4, 2, 1))

MASK_RCNN_VARIANTS: dict[str, dict[str, Any]] = {
    'mask_rcnn_crossformer_small': dict(backbone='crossformer_small', cascade=False, **_GEOMETRY),
    'mask_rcnn_crossformer_base': dict(backbone='crossformer_base', cascade=False, **_GEOMETRY),
    'mask_rcnn_crossformer_pp_small': dict(
        backbone='crossformer_pp_small', cascade=False, **_GEOMETRY
    ),
    'cascade_mask_rcnn_crossformer_small': dict(
        backbone='crossformer_small', cascade=True, **_GEOMETRY
    ),
}

# Neck and head widths of the released configs; the box head's layers depend on the cascade:
# Shared2FCBBoxHead (Mask R-CNN), Shared4Conv1FCBBoxHead with BatchNorm (Cascade Mask R-CNN).
HEAD_DEFAULTS: dict[str, int] = dict(
    fpn_channels=256,
    rpn_channels=256,
    box_conv_channels=256,
    box_fc_channels=1024,
    num_mask_convs=4,
    mask_channels=256,
)
BOX_HEAD_LAYERS: dict[bool, dict[str, int]] = {
    False: dict(num_box_convs=0, num_box_fcs=2),
    True: dict(num_box_convs=4, num_box_fcs=1),
}
# Layer counts may be 0, widths not.
LAYER_COUNT_FIELDS = ('num_box_convs', 'num_box_fcs', 'num_mask_convs')

_OVERRIDABLE = {
    *DENSE_BACKBONE_FIELDS,
    *HEAD_DEFAULTS,
    *BOX_HEAD_LAYERS[False],
    'rpn_anchor_generator',
    'roi_exact_extent',
}


def mask_rcnn_config(name: str, num_classes: int = 80, **overrides) -> dict[str, Any]:
    """Constructor arguments of MaskRCNN for a registered name, overrides applied."""
    if name not in MASK_RCNN_VARIANTS:
        raise ValueError(
            f'unknown Mask R-CNN model {name!r}; available: {", ".join(sorted(MASK_RCNN_VARIANTS))}'
        )
    variant = MASK_RCNN_VARIANTS[name]
    kwargs = dense_model_config(
        name,
        num_classes,
        overrides,
        backbone=variant['backbone'],
        geometry={k: variant[k] for k in ('group_size', 'interval')},
        defaults={
            'cascade': variant['cascade'],
            **HEAD_DEFAULTS,
            **BOX_HEAD_LAYERS[variant['cascade']],
            'rpn_anchor_generator': RPN_ANCHOR_GENERATOR,
            'roi_exact_extent': EXACT_EXTENT,
        },
        allowed=_OVERRIDABLE,
    )
    check_anchor_generator('rpn_anchor_generator', kwargs['rpn_anchor_generator'], PYRAMID_STRIDES)
    widths = [field for field in HEAD_DEFAULTS if field not in LAYER_COUNT_FIELDS]
    check_layer_sizes(kwargs, [*widths, 'roi_exact_extent'], LAYER_COUNT_FIELDS)
    normalize_backbone_fields(kwargs)
    return kwargs


def build_mask_rcnn_model(name: str, num_classes: int = 80, **overrides) -> MaskRCNN:
    """A registered Mask R-CNN model (see MASK_RCNN_VARIANTS) as a Flax module."""
    if overrides.pop('features_only', False):
        raise ValueError(f'{name} is a detection model; features_only does not apply')
    return MaskRCNN(**mask_rcnn_config(name, num_classes, **overrides))


for _name in MASK_RCNN_VARIANTS:
    register_model(_name, task='instance_segmentation', num_classes=80, build=build_mask_rcnn_model)
