"""Independent PyTorch reference of Mask R-CNN and Cascade Mask R-CNN on the CrossFormer backbone
of `crossformer_jax.reference.crossformer`: FPN neck, RPN head, box and mask heads, NCHW as in
PyTorch (the raw outputs; no proposals, sampling, losses or post-processing).

Module and parameter names reproduce MMDetection 2.x state dicts (`backbone.`, `neck.`,
`rpn_head.`, `roi_head.bbox_head(.s).`, `roi_head.mask_head(.s).`; ConvModule `.conv` / `.bn`), so
a released checkpoint's state_dict loads with ``model.load_state_dict(...)``. RoIs are
MMDetection's (K, 5) rows (batch index, x1, y1, x2, y2) in input pixels. Written from the
description of the models (MMDetection's semantics), not from their code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from crossformer_jax.models.mask_rcnn import (
    BOX_ROI_SIZE,
    FINEST_SCALE,
    MASK_ROI_SIZE,
    NUM_CASCADE_STAGES,
    PYRAMID_STRIDES,
    ROI_STRIDES,
    mask_rcnn_config,
)
from crossformer_jax.reference.crossformer import CrossFormer, randomize_parameters
from crossformer_jax.reference.detection import ConvLayer
from crossformer_jax.reference.roi_align import multilevel_roi_align_reference
from crossformer_jax.reference.segmentation import ConvModule


def kaiming_fan_out(module: nn.Module) -> None:
    """Kaiming normal weights (fan-out, ReLU gain) and zero bias, as mmcv initialises them."""
    nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class FPN(nn.Module):
    """FPN on every backbone stage: 1x1 laterals, nearest top-down sum, 3x3 output convs, and
    further levels by max-pooling the last output (kernel 1, stride 2)."""

    def __init__(self, in_channels: Sequence[int], out_channels: int, num_outputs: int):
        super().__init__()
        self.num_outputs = num_outputs
        self.lateral_convs = nn.ModuleList(ConvLayer(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(
            ConvLayer(out_channels, out_channels, 3) for _ in in_channels
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, features)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[2:], mode='nearest'
            )
        outputs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
        while len(outputs) < self.num_outputs:
            outputs.append(F.max_pool2d(outputs[-1], 1, stride=2))
        return outputs


class RPNHead(nn.Module):
    """rpn_conv (3x3) + ReLU, then rpn_cls (1x1, A logits) and rpn_reg (1x1, A * 4 deltas)."""

    def __init__(self, in_channels: int, channels: int, num_anchors: int):
        super().__init__()
        self.rpn_conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(channels, num_anchors, 1)
        self.rpn_reg = nn.Conv2d(channels, num_anchors * 4, 1)
        for module in (self.rpn_conv, self.rpn_cls, self.rpn_reg):
            nn.init.normal_(module.weight, std=0.01)
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu(self.rpn_conv(x))
        return self.rpn_cls(x), self.rpn_reg(x)


class BBoxHead(nn.Module):
    """ConvFCBBoxHead, shared layers only: shared_convs (ConvModule 3x3 with BatchNorm),
    shared_fcs (Linear + ReLU), fc_cls (K + 1) and fc_reg (K * 4, class-specific)."""

    def __init__(self, config: dict, in_channels: int, roi_size: int):
        super().__init__()
        num_classes = config['num_classes']
        widths = [in_channels] + [config['box_conv_channels']] * config['num_box_convs']
        self.shared_convs = nn.ModuleList(
            ConvModule(widths[i], widths[i + 1], 3) for i in range(config['num_box_convs'])
        )
        fc_widths = [widths[-1] * roi_size**2] + [config['box_fc_channels']] * config['num_box_fcs']
        self.shared_fcs = nn.ModuleList(
            nn.Linear(fc_widths[i], fc_widths[i + 1]) for i in range(config['num_box_fcs'])
        )
        self.fc_cls = nn.Linear(fc_widths[-1], num_classes + 1)
        self.fc_reg = nn.Linear(fc_widths[-1], num_classes * 4)
        for module in self.shared_convs:
            kaiming_fan_out(module.conv)
        for module in self.shared_fcs:
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        for module, std in ((self.fc_cls, 0.01), (self.fc_reg, 0.001)):
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoI features (K, C, S, S) -> (class logits (K, classes + 1), deltas (K, classes * 4))."""
        for conv in self.shared_convs:
            x = conv(x)
        x = x.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)


class FCNMaskHead(nn.Module):
    """convs (3x3 + ReLU), upsample (ConvTranspose2d 2x2 stride 2) + ReLU, conv_logits (1x1)."""

    def __init__(self, config: dict, in_channels: int):
        super().__init__()
        channels = config['mask_channels']
        widths = [in_channels] + [channels] * config['num_mask_convs']
        self.convs = nn.ModuleList(
            ConvLayer(widths[i], widths[i + 1], 3, relu=True)
            for i in range(config['num_mask_convs'])
        )
        self.upsample = nn.ConvTranspose2d(widths[-1], channels, 2, stride=2)
        self.conv_logits = nn.Conv2d(channels, config['num_classes'], 1)
        for module in (*(conv.conv for conv in self.convs), self.upsample, self.conv_logits):
            kaiming_fan_out(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """RoI features (K, C, S, S) -> mask logits (K, classes, 2S, 2S)."""
        for conv in self.convs:
            x = conv(x)
        return self.conv_logits(F.relu(self.upsample(x)))


class RoIHead(nn.Module):
    """bbox_head and mask_head, or with cascade a ModuleList of NUM_CASCADE_STAGES of each."""

    def __init__(self, config: dict, in_channels: int):
        super().__init__()
        self.cascade = config['cascade']

        def box() -> BBoxHead:
            return BBoxHead(config, in_channels, BOX_ROI_SIZE)

        def mask() -> FCNMaskHead:
            return FCNMaskHead(config, in_channels)

        if self.cascade:
            self.bbox_head = nn.ModuleList(box() for _ in range(NUM_CASCADE_STAGES))
            self.mask_head = nn.ModuleList(mask() for _ in range(NUM_CASCADE_STAGES))
        else:
            self.bbox_head = box()
            self.mask_head = mask()

    def stage(self, heads: nn.Module, stage: int) -> nn.Module:
        return heads[stage] if self.cascade else heads


class MaskRCNN(nn.Module):
    """backbone -> neck -> rpn_head, and roi_head on given RoIs.

    features(images (N, 3, H, W)) -> 5 maps (N, C, H_l, W_l), strides 4..64;
    rpn(levels) -> (objectness [(N, A, H_l, W_l)], deltas [(N, A * 4, H_l, W_l)]);
    box_head(levels, rois (K, 5), stage=0) -> (class logits (K, classes + 1), deltas (K,
    classes * 4)); mask_head(levels, rois, stage=0) -> mask logits (K, classes, 28, 28).
    """

    def __init__(self, config: dict):
        super().__init__()
        channels = [config['embed_dim'] * 2**s for s in range(4)]
        self.backbone = CrossFormer(
            embed_dim=config['embed_dim'],
            depths=config['depths'],
            num_heads=config['num_heads'],
            group_size=config['group_size'],
            interval=config['interval'],
            version=config['version'],
            drop_path_rate=config['drop_path_rate'],
            features_only=True,
        )
        self.neck = FPN(channels, config['fpn_channels'], len(PYRAMID_STRIDES))
        self.rpn_head = RPNHead(
            config['fpn_channels'],
            config['rpn_channels'],
            config['rpn_anchor_generator'].num_anchors,
        )
        self.roi_head = RoIHead(config, config['fpn_channels'])

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.neck(self.backbone(images))

    def rpn(self, levels: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        outputs = [self.rpn_head(x) for x in levels]
        return [cls for cls, _ in outputs], [reg for _, reg in outputs]

    def roi_features(self, levels: Sequence[torch.Tensor], rois: torch.Tensor, size: int):
        return multilevel_roi_align_reference(
            list(levels[: len(ROI_STRIDES)]), rois, size, ROI_STRIDES, FINEST_SCALE
        )

    def box_head(
        self, levels: Sequence[torch.Tensor], rois: torch.Tensor, stage: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        head = self.roi_head.stage(self.roi_head.bbox_head, stage)
        return head(self.roi_features(levels, rois, BOX_ROI_SIZE))

    def mask_head(
        self, levels: Sequence[torch.Tensor], rois: torch.Tensor, stage: int = 0
    ) -> torch.Tensor:
        head = self.roi_head.stage(self.roi_head.mask_head, stage)
        return head(self.roi_features(levels, rois, MASK_ROI_SIZE))

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The RPN's outputs of images (N, 3, H, W)."""
        return self.rpn(self.features(images))


def create_torch_mask_rcnn_model(name: str, num_classes: int = 80, **overrides) -> MaskRCNN:
    """The PyTorch reference of a registered Mask R-CNN model, in eval mode; overrides as for
    `create_model` (backbone fields and the neck and head widths)."""
    overrides.pop('dtype', None)
    overrides.pop('remat', None)
    return MaskRCNN(mask_rcnn_config(name, num_classes, **overrides)).eval()


@torch.no_grad()
def randomize_mask_rcnn_parameters(model: nn.Module, seed: int) -> nn.Module:
    """`randomize_parameters` (reference.crossformer) of every layer, the mask heads'
    ConvTranspose2d included (weights ~ N(0, 1 / fan_in), fan_in = input channels * 4, biases ~
    N(0, 0.1^2)); each layer with its own seed derived from `seed`. In place."""
    generator = torch.Generator().manual_seed(seed)
    for index, module in enumerate(model.modules()):
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        if isinstance(module, nn.ConvTranspose2d):
            fan_in = module.weight.shape[0] * module.weight.shape[2] * module.weight.shape[3]
            weight = torch.randn(module.weight.shape, generator=generator, dtype=torch.float64)
            module.weight.copy_(weight * fan_in**-0.5)
            module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
        else:
            randomize_parameters(module, seed * 100_003 + index)
    return model
