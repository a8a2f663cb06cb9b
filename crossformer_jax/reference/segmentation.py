"""Independent PyTorch reference of the segmentation models (UPerNet and Semantic FPN heads on the
CrossFormer backbone of `crossformer_jax.reference.crossformer`), NCHW as in PyTorch.

Module and parameter names reproduce MMSegmentation's state dicts (`backbone.`, `decode_head.`,
`auxiliary_head.`, `neck.`; ConvModule `.conv` / `.bn`), so a released checkpoint loads with
``model.load_state_dict(...)``. Written from the description of the heads, not from their code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from crossformer_jax.models.segmentation import POOL_SCALES, segmentation_config
from crossformer_jax.reference.crossformer import CrossFormer


def resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear, align_corners=False, no antialiasing (F.interpolate's default)."""
    return F.interpolate(x, size=tuple(size), mode='bilinear', align_corners=False)


class ConvModule(nn.Module):
    """conv (no bias) -> BatchNorm2d -> ReLU; with norm=False a conv with bias alone."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, norm: bool = True):
        super().__init__()
        self.norm = norm
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=not norm)
        if norm:
            self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return F.relu(self.bn(x)) if self.norm else x


class Upsample2x(nn.Module):
    """Bilinear x2 upsampling (align_corners=False); holds no weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode='bilinear', align_corners=False)


class DecodeHead(nn.Module):
    """Base of the heads: cls_seg = Dropout2d -> 1x1 conv 'conv_seg'."""

    def __init__(self, channels: int, num_classes: int, dropout_rate: float):
        super().__init__()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout_rate)

    def cls_seg(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(x))


class UPerHead(DecodeHead):
    def __init__(self, in_channels, channels, num_classes, dropout_rate, pool_scales=POOL_SCALES):
        super().__init__(channels, num_classes, dropout_rate)
        top = in_channels[-1]
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvModule(top, channels, 1))
            for scale in pool_scales
        )
        self.bottleneck = ConvModule(top + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3)

    def forward(self, features):
        top = features[-1]
        pooled = [resize(module(top), top.shape[2:]) for module in self.psp_modules]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, features)]
        laterals.append(self.bottleneck(torch.cat([top, *pooled], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:])
        outputs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        outputs = [outputs[0]] + [resize(x, outputs[0].shape[2:]) for x in outputs[1:]]
        return self.cls_seg(self.fpn_bottleneck(torch.cat(outputs, dim=1)))


class FCNHead(DecodeHead):
    """The auxiliary head: one ConvModule 3x3, then cls_seg."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout_rate: float):
        super().__init__(channels, num_classes, dropout_rate)
        self.convs = nn.Sequential(ConvModule(in_channels, channels, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls_seg(self.convs(x))


class FPN(nn.Module):
    """The neck: 1x1 laterals with bias, nearest top-down sum, 3x3 output convs with bias."""

    def __init__(self, in_channels, out_channels: int):
        super().__init__()
        self.lateral_convs = nn.ModuleList(
            ConvModule(c, out_channels, 1, norm=False) for c in in_channels
        )
        self.fpn_convs = nn.ModuleList(
            ConvModule(out_channels, out_channels, 3, norm=False) for _ in in_channels
        )

    def forward(self, features):
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, features)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[2:], mode='nearest'
            )
        return [conv(x) for conv, x in zip(self.fpn_convs, laterals)]


class FPNHead(DecodeHead):
    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout_rate: float):
        super().__init__(channels, num_classes, dropout_rate)
        heads = []
        for i in range(4):
            layers = []
            for j in range(max(1, i)):
                layers.append(ConvModule(in_channels if j == 0 else channels, channels, 3))
                if i > 0:
                    layers.append(Upsample2x())
            heads.append(nn.Sequential(*layers))
        self.scale_heads = nn.ModuleList(heads)

    def forward(self, features):
        output = self.scale_heads[0](features[0])
        for head, x in zip(self.scale_heads[1:], features[1:]):
            output = output + resize(head(x), output.shape[2:])
        return self.cls_seg(output)


class EncoderDecoder(nn.Module):
    """backbone -> (neck) -> decode_head; forward gives logits (N, classes, H, W) at the input
    size. `auxiliary(images)` gives the auxiliary head's logits at the input size (UPerNet)."""

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
        num_classes, dropout = config['num_classes'], config['dropout_rate']
        if config['head'] == 'upernet':
            self.decode_head = UPerHead(channels, config['head_channels'], num_classes, dropout)
            if config['aux_channels'] is not None:
                self.auxiliary_head = FCNHead(
                    channels[2], config['aux_channels'], num_classes, dropout
                )
        else:
            self.neck = FPN(channels, config['neck_channels'])
            self.decode_head = FPNHead(
                config['neck_channels'], config['head_channels'], num_classes, dropout
            )

    def features(self, images: torch.Tensor):
        features = self.backbone(images)
        return self.neck(features) if hasattr(self, 'neck') else features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return resize(self.decode_head(self.features(images)), images.shape[2:])

    def auxiliary(self, images: torch.Tensor) -> torch.Tensor:
        return resize(self.auxiliary_head(self.backbone(images)[2]), images.shape[2:])


def create_torch_segmentation_model(
    name: str, num_classes: int = 150, **overrides
) -> EncoderDecoder:
    """The PyTorch reference of a registered segmentation model, in eval mode; overrides as for
    `create_model` (backbone fields, head_channels, aux_channels / neck_channels, dropout_rate)."""
    overrides.pop('dtype', None)
    overrides.pop('remat', None)
    return EncoderDecoder(segmentation_config(name, num_classes, **overrides)).eval()


@torch.no_grad()
def randomize_batch_norm_statistics(model: nn.Module, seed: int) -> nn.Module:
    """Redraws every BatchNorm's running mean ~ 0.1 N(0, 1) and running variance ~ U(0.5, 2),
    deterministically for ``seed``; in place. num_batches_tracked is left alone."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            shape = module.running_mean.shape
            module.running_mean.copy_(0.1 * torch.randn(shape, generator=generator))
            module.running_var.copy_(0.5 + 1.5 * torch.rand(shape, generator=generator))
    return model
