"""Independent PyTorch implementation of CrossFormer and CrossFormer++ (docs/architecture.md).

Used as the numerical reference for the Flax model and as the PyTorch side of the CPU benchmark.
Module and parameter names reproduce the state dicts of the published checkpoints, so a
checkpoint loads with ``model.load_state_dict(...)``. Inside the network, token grids are kept
channels-last, (B, H, W, C); images come in and backbone features go out as NCHW.

Torch is an optional dependency of the package and is imported only here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from crossformer_jax.models.crossformer import VARIANTS

PATCH_KERNELS = (4, 8, 16, 32)
MERGE_KERNELS = (2, 4)
MLP_RATIO = 4
MASK_VALUE = -1e6
IMAGE_MULTIPLE = 32
REFERENCE_IMAGE_SIZE = 224


# --------------------------------------------------------------------------------------------
# Grouping geometry
# --------------------------------------------------------------------------------------------


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class GroupLayout:
    """How one block cuts an H x W token grid into attention groups.

    The grid is zero-padded at the bottom/right to ``padded_height x padded_width`` and cut into
    regions of ``(group_height * interval) x (group_width * interval)`` tokens. Inside a region the
    group with offset (a, b), 0 <= a, b < interval, holds the tokens at rows a, a + interval, ...
    and columns b, b + interval, ... (row-major). ``interval == 1`` is plain windowing (SDA).
    """

    group_height: int
    group_width: int
    interval: int
    padded_height: int
    padded_width: int


def group_layout(
    height: int, width: int, group_size: int, interval: int, long_distance: bool, version: str
) -> GroupLayout:
    """The grouping a block uses on an ``height x width`` grid (docs/architecture.md: grouping)."""
    if min(height, width) <= group_size:
        # Small map: SDA with one group size; v1 tiles with min(H, W), ++ takes the whole map.
        size = min(height, width) if version == 'v1' else max(height, width)
        return GroupLayout(size, size, 1, _round_up(height, size), _round_up(width, size))
    if not long_distance:
        size = group_size
        return GroupLayout(size, size, 1, _round_up(height, size), _round_up(width, size))
    if version == 'v1':
        # Fixed interval, groups grow with the image: one region covering the padded map.
        gh, gw = -(-height // interval), -(-width // interval)
        return GroupLayout(gh, gw, interval, gh * interval, gw * interval)
    region = group_size * interval
    return GroupLayout(
        group_size, group_size, interval, _round_up(height, region), _round_up(width, region)
    )


def to_groups(x: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """(B, Hp, Wp, C) -> (B * groups_per_image, Gh * Gw, C); batch outermost."""
    batch, padded_height, padded_width, channels = x.shape
    gh, gw, step = layout.group_height, layout.group_width, layout.interval
    regions_h, regions_w = padded_height // (gh * step), padded_width // (gw * step)
    x = x.reshape(batch, regions_h, gh, step, regions_w, gw, step, channels)
    # -> (B, region row, region col, offset a, offset b, position in group h, w, C)
    x = x.permute(0, 1, 4, 3, 6, 2, 5, 7)
    return x.reshape(-1, gh * gw, channels)


def from_groups(groups: torch.Tensor, layout: GroupLayout, batch: int) -> torch.Tensor:
    """Inverse of :func:`to_groups`: (B * groups_per_image, Gh * Gw, C) -> (B, Hp, Wp, C)."""
    gh, gw, step = layout.group_height, layout.group_width, layout.interval
    regions_h = layout.padded_height // (gh * step)
    regions_w = layout.padded_width // (gw * step)
    channels = groups.shape[-1]
    x = groups.reshape(batch, regions_h, regions_w, step, step, gh, gw, channels)
    x = x.permute(0, 1, 5, 3, 2, 6, 4, 7)
    return x.reshape(batch, layout.padded_height, layout.padded_width, channels)


def padding_key_mask(height: int, width: int, layout: GroupLayout, batch: int) -> torch.Tensor:
    """Additive key mask (B * groups_per_image, Gh * Gw): MASK_VALUE on padded tokens, else 0."""
    is_padding = torch.ones(1, layout.padded_height, layout.padded_width, 1)
    is_padding[:, :height, :width] = 0
    return to_groups(is_padding, layout)[..., 0].repeat(batch, 1) * MASK_VALUE


def relative_offsets(group_height: int, group_width: int, device=None) -> torch.Tensor:
    """All offsets (dh, dw) inside a Gh x Gw group, dh outer: ((2Gh-1)(2Gw-1), 2) float32."""
    dh = torch.arange(1 - group_height, group_height, device=device)
    dw = torch.arange(1 - group_width, group_width, device=device)
    grid = torch.stack(torch.meshgrid(dh, dw, indexing='ij'), dim=-1)
    return grid.reshape(-1, 2).float()


def relative_position_index(group_height: int, group_width: int, device=None) -> torch.Tensor:
    """Row of :func:`relative_offsets` for each (query, key) pair: (Gh*Gw, Gh*Gw) int64."""
    rows = torch.arange(group_height, device=device).repeat_interleave(group_width)
    cols = torch.arange(group_width, device=device).repeat(group_height)
    dh = rows[:, None] - rows[None, :] + group_height - 1
    dw = cols[:, None] - cols[None, :] + group_width - 1
    return dh * (2 * group_width - 1) + dw


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


class DropPath(nn.Module):
    """Stochastic depth: zeroes whole samples of a residual branch in training mode."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class CrossScaleEmbedding(nn.Module):
    """First CEL: images (B, 3, H, W) -> tokens (B, H/4, W/4, embed_dim)."""

    def __init__(self, embed_dim: int):
        super().__init__()
        last = len(PATCH_KERNELS) - 1
        channels = [embed_dim // 2 ** (i + 1) for i in range(last)] + [embed_dim // 2**last]
        self.projs = nn.ModuleList(
            nn.Conv2d(3, out, kernel, stride=4, padding=(kernel - 4) // 2)
            for out, kernel in zip(channels, PATCH_KERNELS)
        )
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.cat([proj(images) for proj in self.projs], dim=1)
        return self.norm(x.permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """CEL between stages: (B, H, W, C) -> (B, H/2, W/2, 2C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.reductions = nn.ModuleList(
            nn.Conv2d(dim, dim, kernel, stride=2, padding=(kernel - 2) // 2)
            for kernel in MERGE_KERNELS
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x).permute(0, 3, 1, 2)
        x = torch.cat([reduction(x) for reduction in self.reductions], dim=1)
        return x.permute(0, 2, 3, 1)


def _dpb_layer(in_features: int, out_features: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(in_features), nn.ReLU(), nn.Linear(in_features, out_features))


class DynamicPositionBias(nn.Module):
    """DPB: relative offsets (R, 2) -> per-head bias (R, heads)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        pos_dim = (dim // 4) // 4
        self.pos_proj = nn.Linear(2, pos_dim)
        self.pos1 = _dpb_layer(pos_dim, pos_dim)
        self.pos2 = _dpb_layer(pos_dim, pos_dim)
        self.pos3 = _dpb_layer(pos_dim, num_heads)

    def forward(self, offsets: torch.Tensor) -> torch.Tensor:
        return self.pos3(self.pos2(self.pos1(self.pos_proj(offsets))))


class Attention(nn.Module):
    """Multi-head self-attention inside groups, biased by the DPB.

    ``buffer_group_size`` (v1 only) registers the derived buffers ``biases`` and
    ``relative_position_index`` found in the v1 classification checkpoints; the forward pass
    never reads them, it derives offsets and indices from the group shape of each call.
    """

    def __init__(self, dim: int, num_heads: int, buffer_group_size: tuple[int, int] | None):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.pos = DynamicPositionBias(dim, num_heads)
        if buffer_group_size is not None:
            self.register_buffer('biases', relative_offsets(*buffer_group_size))
            self.register_buffer(
                'relative_position_index', relative_position_index(*buffer_group_size)
            )
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        groups: torch.Tensor,
        group_height: int,
        group_width: int,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """groups (num_groups, N, C) with N = Gh * Gw; key_mask (num_groups, N), additive."""
        num_groups, tokens, dim = groups.shape
        qkv = self.qkv(groups).reshape(num_groups, tokens, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (num_groups, heads, N, head_dim)
        logits = (q * self.scale) @ k.transpose(-2, -1)

        offsets = relative_offsets(group_height, group_width, device=groups.device)
        index = relative_position_index(group_height, group_width, device=groups.device)
        bias = self.pos(offsets.to(groups.dtype))[index]  # (N, N, heads)
        logits = logits + bias.permute(2, 0, 1)
        if key_mask is not None:
            logits = logits + key_mask[:, None, None, :]

        out = logits.softmax(dim=-1) @ v  # (num_groups, heads, N, head_dim)
        return self.proj(out.transpose(1, 2).reshape(num_groups, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class CrossFormerBlock(nn.Module):
    """SDA or LDA attention + MLP, optionally followed by the ACL: (B, H, W, C) -> same."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        group_size: int,
        interval: int,
        long_distance: bool,
        version: str,
        drop_path: float,
        cooling: bool,
        buffer_group_size: tuple[int, int] | None,
    ):
        super().__init__()
        self.group_size = group_size
        self.interval = interval
        self.long_distance = long_distance
        self.version = version
        self.cooling = cooling
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, buffer_group_size)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, MLP_RATIO * dim)
        if cooling:
            self.ex_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
            self.ex_ln = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        layout = group_layout(
            height, width, self.group_size, self.interval, self.long_distance, self.version
        )
        pad_h, pad_w = layout.padded_height - height, layout.padded_width - width

        y = self.norm1(x)
        key_mask = None
        if pad_h or pad_w:
            y = F.pad(y, (0, 0, 0, pad_w, 0, pad_h))
            key_mask = padding_key_mask(height, width, layout, batch).to(x.device, x.dtype)
        y = self.attn(to_groups(y, layout), layout.group_height, layout.group_width, key_mask)
        y = from_groups(y, layout, batch)[:, :height, :width]

        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        if self.cooling:
            x = self.ex_ln(self.ex_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        return x


class Stage(nn.Module):
    """Blocks of one resolution, then the merge (except after the last stage)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        group_size: int,
        interval: int,
        version: str,
        drop_path_rates: Sequence[float],
        grid_at_224: int,
        downsample: bool,
    ):
        super().__init__()
        blocks = []
        for j in range(depth):
            long_distance = j % 2 == 1
            buffer_group_size = None
            if version == 'v1':
                layout = group_layout(
                    grid_at_224, grid_at_224, group_size, interval, long_distance, version
                )
                buffer_group_size = (layout.group_height, layout.group_width)
            blocks.append(
                CrossFormerBlock(
                    dim,
                    num_heads,
                    group_size,
                    interval,
                    long_distance,
                    version,
                    drop_path_rates[j],
                    cooling=version == 'pp' and (j + 1) % 3 == 0 and j < depth - 1,
                    buffer_group_size=buffer_group_size,
                )
            )
        self.blocks = nn.ModuleList(blocks)
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, W, C) -> (stage output (B, H, W, C), next stage input)."""
        for block in self.blocks:
            x = block(x)
        return x, (self.downsample(x) if self.downsample is not None else x)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class CrossFormer(nn.Module):
    """CrossFormer (``version='v1'``) or CrossFormer++ (``version='pp'``).

    forward: images (N, 3, H, W), H and W multiples of 32 -> logits (N, num_classes), or with
    ``features_only`` the list of stage outputs (N, C_s, H / 2^(s+2), W / 2^(s+2)).
    """

    def __init__(
        self,
        embed_dim: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        group_size: Sequence[int],
        interval: Sequence[int],
        version: str,
        drop_path_rate: float,
        num_classes: int = 1000,
        features_only: bool = False,
    ):
        super().__init__()
        if version not in ('v1', 'pp'):
            raise ValueError(f"version must be 'v1' or 'pp', found {version!r}")
        if not len(depths) == len(num_heads) == len(group_size) == len(interval):
            raise ValueError(
                'depths, num_heads, group_size and interval need one entry per stage, found '
                f'{len(depths)}, {len(num_heads)}, {len(group_size)}, {len(interval)}'
            )
        self.features_only = features_only
        num_stages = len(depths)
        num_blocks = sum(depths)
        rates = [drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]

        self.patch_embed = CrossScaleEmbedding(embed_dim)
        self.layers = nn.ModuleList(
            Stage(
                dim=embed_dim * 2**s,
                depth=depths[s],
                num_heads=num_heads[s],
                group_size=group_size[s],
                interval=interval[s],
                version=version,
                drop_path_rates=rates[sum(depths[:s]) : sum(depths[: s + 1])],
                grid_at_224=REFERENCE_IMAGE_SIZE // 2 ** (s + 2),
                downsample=s < num_stages - 1,
            )
            for s in range(num_stages)
        )
        if not features_only:
            final_dim = embed_dim * 2 ** (num_stages - 1)
            self.norm = nn.LayerNorm(final_dim)
            self.head = nn.Linear(final_dim, num_classes)
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        _check_images(images)
        x = self.patch_embed(images)
        features = []
        for stage in self.layers:
            stage_output, x = stage(x)
            features.append(stage_output)
        if self.features_only:
            return [feature.permute(0, 3, 1, 2) for feature in features]
        return self.head(self.norm(x).mean(dim=(1, 2)))


def _init_weights(module: nn.Module) -> None:
    """Training-from-scratch init of the original code; convolutions keep PyTorch's default."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f'expected images of shape (N, 3, H, W), found {tuple(images.shape)}')
    height, width = images.shape[2:]
    if height % IMAGE_MULTIPLE or width % IMAGE_MULTIPLE or not height or not width:
        raise ValueError(
            f'expected H and W to be positive multiples of {IMAGE_MULTIPLE}, found {height}x{width}'
        )


def create_torch_model(
    name: str, num_classes: int = 1000, features_only: bool = False, **overrides
) -> CrossFormer:
    """Builds the PyTorch reference of a registered variant (``VARIANTS``), in eval mode.

    ``overrides`` replace fields of the variant's config (embed_dim, depths, num_heads,
    group_size, interval, version, drop_path_rate).
    """
    if name not in VARIANTS:
        raise ValueError(f'unknown model {name!r}, expected one of {sorted(VARIANTS)}')
    config = {**VARIANTS[name], **overrides}
    return CrossFormer(**config, num_classes=num_classes, features_only=features_only).eval()


@torch.no_grad()
def randomize_parameters(model: nn.Module, seed: int) -> nn.Module:
    """Redraws every parameter away from its init, deterministically for ``seed``; in place.

    Linear and conv weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2), LayerNorm and BatchNorm
    scales ~ 1 + 0.1 N and biases ~ 0.1 N, so that activations stay well scaled through deep models
    while every parameter, down to the DPB and norm biases, visibly affects the output. Buffers
    are untouched.
    """
    generator = torch.Generator().manual_seed(seed)

    def draw(tensor: torch.Tensor, mean: float, std: float) -> None:
        values = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
        tensor.copy_(mean + std * values)

    covered = set()
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            fan_in = math.prod(module.weight.shape[1:])
            draw(module.weight, 0.0, fan_in**-0.5)
            if module.bias is not None:
                draw(module.bias, 0.0, 0.1)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            draw(module.weight, 1.0, 0.1)
            draw(module.bias, 0.0, 0.1)
        else:
            continue
        covered.update(id(p) for p in module.parameters(recurse=False))
    missed = [name for name, p in model.named_parameters() if id(p) not in covered]
    if missed:
        raise TypeError(f'randomize_parameters does not know how to draw {missed}')
    return model
