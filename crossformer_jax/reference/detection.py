"""Independent PyTorch reference of the detection model (RetinaNet: FPN neck and RetinaHead on the
CrossFormer backbone of `crossformer_jax.reference.crossformer`), NCHW as in PyTorch, and of its
test-time post-processing.

Module and parameter names reproduce MMDetection 2.x state dicts (`backbone.`, `neck.`,
`bbox_head.`; ConvModule `.conv`), so a released checkpoint's state_dict loads with
``model.load_state_dict(...)``. Written from the description of the model (MMDetection's
semantics), not from its code; the post-processing here is plain PyTorch, written apart from the
JAX one (crossformer_jax.detection.postprocess) so that each checks the other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from crossformer_jax.models.detection import detection_config
from crossformer_jax.reference.crossformer import CrossFormer

# Box decoding clamps the log size ratios to +-log(1000 / 16) (MMDetection's wh_ratio_clip).
MAX_LOG_RATIO = abs(math.log(16 / 1000))


class ConvLayer(nn.Module):
    """A ConvModule without norm: `conv` (with bias), then ReLU when asked."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride=1, relu=False):
        super().__init__()
        self.relu = relu
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return F.relu(x) if self.relu else x


class FPN(nn.Module):
    """FPN, start level 1, 5 outputs, extra convs on the last backbone input (stride 2 each)."""

    def __init__(self, in_channels: Sequence[int], out_channels: int, num_outputs: int = 5):
        super().__init__()
        inputs = in_channels[1:]
        self.lateral_convs = nn.ModuleList(ConvLayer(c, out_channels, 1) for c in inputs)
        convs = [ConvLayer(out_channels, out_channels, 3) for _ in inputs]
        convs.append(ConvLayer(inputs[-1], out_channels, 3, stride=2))
        convs += [
            ConvLayer(out_channels, out_channels, 3, stride=2)
            for _ in range(num_outputs - len(inputs) - 1)
        ]
        self.fpn_convs = nn.ModuleList(convs)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        inputs = features[1:]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[2:], mode='nearest'
            )
        outputs = [self.fpn_convs[i](x) for i, x in enumerate(laterals)]
        extra = inputs[-1]
        for conv in self.fpn_convs[len(laterals) :]:
            extra = conv(extra)
            outputs.append(extra)
        return outputs


class RetinaHead(nn.Module):
    """Two towers of 3x3 conv + ReLU (cls_convs, reg_convs), then retina_cls (A*K channels) and
    retina_reg (A*4), applied to every level with the same weights."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_convs: int,
        num_classes: int,
        num_anchors: int,
        prior_probability: float = 0.01,
    ):
        super().__init__()
        widths = [in_channels] + [channels] * num_convs
        self.cls_convs = nn.ModuleList(
            ConvLayer(widths[i], channels, 3, relu=True) for i in range(num_convs)
        )
        self.reg_convs = nn.ModuleList(
            ConvLayer(widths[i], channels, 3, relu=True) for i in range(num_convs)
        )
        self.retina_cls = nn.Conv2d(widths[-1], num_anchors * num_classes, 3, padding=1)
        self.retina_reg = nn.Conv2d(widths[-1], num_anchors * 4, 3, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)
        nn.init.constant_(
            self.retina_cls.bias, -math.log((1 - prior_probability) / prior_probability)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cls_x, reg_x = x, x
        for conv in self.cls_convs:
            cls_x = conv(cls_x)
        for conv in self.reg_convs:
            reg_x = conv(reg_x)
        return self.retina_cls(cls_x), self.retina_reg(reg_x)


class RetinaNet(nn.Module):
    """backbone -> neck -> bbox_head. forward(images (N, 3, H, W)) -> (cls_scores, bbox_preds):
    lists of 5 levels, (N, A*K, H_l, W_l) logits and (N, A*4, H_l, W_l) deltas."""

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
        self.neck = FPN(channels, config['fpn_channels'])
        self.bbox_head = RetinaHead(
            config['fpn_channels'],
            config['head_channels'],
            config['num_head_convs'],
            config['num_classes'],
            config['anchor_generator'].num_anchors,
        )

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        levels = self.neck(self.backbone(images))
        outputs = [self.bbox_head(x) for x in levels]
        return [cls for cls, _ in outputs], [reg for _, reg in outputs]


def create_torch_detection_model(name: str, num_classes: int = 80, **overrides) -> RetinaNet:
    """The PyTorch reference of a registered detection model, in eval mode; overrides as for
    `create_model` (backbone fields, fpn_channels, head_channels, num_head_convs,
    anchor_generator)."""
    overrides.pop('dtype', None)
    overrides.pop('remat', None)
    return RetinaNet(detection_config(name, num_classes, **overrides)).eval()


# -------------------------------------------------------------------------------------------------
# Test-time post-processing.


def level_anchors(
    height: int,
    width: int,
    stride: int,
    octave_base_scale: float,
    scales_per_octave: int,
    ratios: Sequence[float],
) -> torch.Tensor:
    """(height * width * A, 4) anchors (x1, y1, x2, y2) of one level, (y, x, anchor) order;
    anchor a = ratio-major index over (ratio, scale)."""
    scales = torch.tensor(
        [octave_base_scale * 2 ** (i / scales_per_octave) for i in range(scales_per_octave)],
        dtype=torch.float32,
    )
    h_ratios = torch.sqrt(torch.tensor(ratios, dtype=torch.float32))
    w_ratios = 1 / h_ratios
    widths = (stride * w_ratios[:, None] * scales[None, :]).reshape(-1)
    heights = (stride * h_ratios[:, None] * scales[None, :]).reshape(-1)
    base = torch.stack([-widths / 2, -heights / 2, widths / 2, heights / 2], dim=1)  # (A, 4)
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float32) * stride,
        torch.arange(width, dtype=torch.float32) * stride,
        indexing='ij',
    )
    shifts = torch.stack([xs, ys, xs, ys], dim=-1).reshape(-1, 1, 4)
    return (shifts + base[None]).reshape(-1, 4)


def decode_boxes(anchors: torch.Tensor, deltas: torch.Tensor, height: int, width: int):
    """DeltaXYWH decoding (means 0, stds 1) of (M, 4) deltas on (M, 4) anchors, clipped to x in
    [0, width], y in [0, height]."""
    px = (anchors[:, 0] + anchors[:, 2]) * 0.5
    py = (anchors[:, 1] + anchors[:, 3]) * 0.5
    pw = anchors[:, 2] - anchors[:, 0]
    ph = anchors[:, 3] - anchors[:, 1]
    dx, dy = deltas[:, 0], deltas[:, 1]
    dw = deltas[:, 2].clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    dh = deltas[:, 3].clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    gx, gy = px + pw * dx, py + ph * dy
    gw, gh = pw * dw.exp(), ph * dh.exp()
    boxes = torch.stack([gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return boxes


def box_iou(box: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """IoU (no +1) of one (4,) box with (M, 4) boxes -> (M,)."""
    w = (torch.minimum(box[2], boxes[:, 2]) - torch.maximum(box[0], boxes[:, 0])).clamp(min=0)
    h = (torch.minimum(box[3], boxes[:, 3]) - torch.maximum(box[1], boxes[:, 1])).clamp(min=0)
    overlap = w * h
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return overlap / (area + areas - overlap).clamp(min=torch.finfo(torch.float32).eps)


def greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of the boxes kept by greedy NMS, by descending score: each kept box removes the
    remaining ones whose IoU with it exceeds iou_threshold."""
    order = torch.argsort(scores, descending=True, stable=True)
    kept = []
    while order.numel():
        best = order[0]
        kept.append(int(best))
        rest = order[1:]
        order = rest[box_iou(boxes[best], boxes[rest]) <= iou_threshold]
    return torch.tensor(kept, dtype=torch.long)


@torch.no_grad()
def detect_single(
    cls_scores: Sequence[torch.Tensor],
    bbox_preds: Sequence[torch.Tensor],
    image_shape: tuple[int, int],
    anchor_generator,
    *,
    pre_nms_top_k: int = 1000,
    score_threshold: float = 0.05,
    iou_threshold: float = 0.5,
    max_detections: int = 100,
) -> dict[str, torch.Tensor]:
    """Detections of one image from its head outputs (per level (A*K, H_l, W_l) logits and
    (A*4, H_l, W_l) deltas): per level the pre_nms_top_k anchors of highest best-class score,
    decoded and clipped to image_shape (h, w); every (box, class) pair scoring above
    score_threshold; class-wise greedy NMS; the max_detections best. Returns boxes (D, 4),
    scores (D,), classes (D,) int64, by descending score."""
    height, width = image_shape
    num_anchors = anchor_generator.num_anchors
    all_boxes, all_scores = [], []
    for stride, logits, deltas in zip(anchor_generator.strides, cls_scores, bbox_preds):
        _, h, w = logits.shape
        # Channel a * K + k at (y, x) -> row (y * w + x) * A + a, column k.
        scores = torch.sigmoid(logits.permute(1, 2, 0).reshape(h * w * num_anchors, -1))
        level_deltas = deltas.permute(1, 2, 0).reshape(-1, 4)
        anchors = level_anchors(
            h,
            w,
            stride,
            anchor_generator.octave_base_scale,
            anchor_generator.scales_per_octave,
            anchor_generator.ratios,
        )
        if scores.shape[0] > pre_nms_top_k:
            top = torch.topk(scores.max(dim=1).values, pre_nms_top_k).indices
            scores, level_deltas, anchors = scores[top], level_deltas[top], anchors[top]
        all_boxes.append(decode_boxes(anchors, level_deltas, height, width))
        all_scores.append(scores)
    boxes, scores = torch.cat(all_boxes), torch.cat(all_scores)
    anchor_index, classes = torch.nonzero(scores > score_threshold, as_tuple=True)
    boxes, scores = boxes[anchor_index], scores[anchor_index, classes]
    kept = [
        torch.nonzero(classes == c, as_tuple=True)[0][
            greedy_nms(boxes[classes == c], scores[classes == c], iou_threshold)
        ]
        for c in torch.unique(classes)
    ]
    kept = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long)
    kept = kept[torch.argsort(scores[kept], descending=True, stable=True)][:max_detections]
    return {'boxes': boxes[kept], 'scores': scores[kept], 'classes': classes[kept]}
