"""Parameter and multiply-accumulate (MAC) counts of the CrossFormer variants.

`count_macs` is analytic: it counts the MACs of every convolution, dense layer and attention
matmul the Flax model runs (attention over padded groups included), one image at a time.
Normalisations, activations and softmax are not counted, as in the paper's GMACs.

    python -m crossformer_jax.models.complexity [--image-size 224] [--num-classes 1000]
    python -m crossformer_jax.models.complexity --segmentation [--image-size 512]
        [--num-classes 150]

Segmentation models: backbone MACs as above plus the heads' convolutions counted analytically
(inference: decode head only, as the auxiliary head runs in training only); pooling, resizing,
BatchNorm and ReLU are not counted.
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp

from crossformer_jax.models.crossformer import (
    ARCHITECTURE_FIELDS,
    VARIANTS,
    CrossFormer,
    cross_scale_channels,
    group_layout,
    model_config,
)
from crossformer_jax.models.registry import create_model, model_spec
from crossformer_jax.models.segmentation import SEGMENTATION_VARIANTS


def count_params(name: str, num_classes: int | None = None, **kwargs) -> int:
    """Number of parameters of a registered model (shapes only; nothing is allocated), built with
    `create_model(name, num_classes, **kwargs)`; without BatchNorm statistics."""
    model = create_model(name, num_classes, **kwargs)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32))
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes['params'])))


def _conv_macs(out_h: int, out_w: int, kernel: int, in_ch: int, out_ch: int, groups: int = 1):
    return out_h * out_w * kernel * kernel * (in_ch // groups) * out_ch


def _block_macs(h: int, w: int, dim: int, heads: int, mlp_ratio: float, layout) -> int:
    hp, wp = layout.padded
    gh, gw = layout.group
    tokens = gh * gw
    groups = hp * wp // tokens
    pos_dim = (dim // 4) // 4
    rows = (2 * gh - 1) * (2 * gw - 1)
    macs = hp * wp * dim * 3 * dim  # qkv (padded tokens included)
    macs += 2 * groups * tokens * tokens * dim  # q @ k^T and weights @ v over all heads
    macs += hp * wp * dim * dim  # proj
    macs += rows * (2 * pos_dim + 2 * pos_dim * pos_dim + pos_dim * heads)  # DPB MLP
    macs += 2 * h * w * dim * int(dim * mlp_ratio)  # fc1 + fc2
    return macs


def count_macs(
    name: str,
    image_size: tuple[int, int] | int = 224,
    num_classes: int = 1000,
    features_only: bool = False,
    **overrides,
) -> int:
    """MACs of one forward pass of one image of `image_size` (H, W) through a registered variant."""
    model = CrossFormer(**model_config(name, num_classes, features_only, **overrides))
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    stride = model.patch_kernel_sizes[0]
    h, w = height // stride, width // stride
    channels = cross_scale_channels(model.embed_dim, len(model.patch_kernel_sizes))
    macs = sum(_conv_macs(h, w, k, 3, ch) for k, ch in zip(model.patch_kernel_sizes, channels))
    dim = model.embed_dim
    for s, depth in enumerate(model.depths):
        for j in range(depth):
            layout = group_layout(
                h,
                w,
                group_size=model.group_size[s],
                interval=model.interval[s],
                long_distance=j % 2 == 1,
                version=model.version,
            )
            macs += _block_macs(h, w, dim, model.num_heads[s], model.mlp_ratio, layout)
            if model.version == 'pp' and (j + 1) % 3 == 0 and j < depth - 1:
                macs += _conv_macs(h, w, 3, dim, dim, groups=dim)  # ACL depthwise conv
        if s < len(model.depths) - 1:
            merge_channels = cross_scale_channels(2 * dim, len(model.merge_kernel_sizes))
            macs += sum(
                _conv_macs(h // 2, w // 2, k, dim, ch)
                for k, ch in zip(model.merge_kernel_sizes, merge_channels)
            )
            h, w, dim = h // 2, w // 2, 2 * dim
    if not features_only:
        macs += dim * num_classes
    return int(macs)


def count_segmentation_macs(
    name: str, image_size: tuple[int, int] | int = 512, num_classes: int = 150, **overrides
) -> int:
    """MACs of one inference pass (backbone + neck + decode head) of one image of `image_size`
    through a registered segmentation model."""
    model = create_model(name, num_classes, **overrides)
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    macs = count_macs(
        'crossformer_small',  # any variant: every architecture field is given
        (height, width),
        features_only=True,
        **{k: getattr(model, k) for k in ARCHITECTURE_FIELDS},
    )
    sizes = [(height // 2 ** (s + 2), width // 2 ** (s + 2)) for s in range(4)]
    channels = [model.embed_dim * 2**s for s in range(4)]
    head = model.head_channels
    if model.head == 'upernet':
        (h3, w3), (h0, w0) = sizes[3], sizes[0]
        macs += sum(_conv_macs(s, s, 1, channels[3], head) for s in (1, 2, 3, 6))  # psp_modules
        macs += _conv_macs(h3, w3, 3, channels[3] + 4 * head, head)  # bottleneck
        for (h, w), c in zip(sizes[:3], channels[:3]):
            macs += _conv_macs(h, w, 1, c, head) + _conv_macs(h, w, 3, head, head)  # lateral, fpn
        macs += _conv_macs(h0, w0, 3, 4 * head, head)  # fpn_bottleneck
    else:
        neck = model.neck_channels
        for (h, w), c in zip(sizes, channels):
            macs += _conv_macs(h, w, 1, c, neck) + _conv_macs(h, w, 3, neck, neck)
        for i in range(4):
            for j in range(max(1, i)):  # conv j of scale head i runs at level i - j
                h, w = sizes[i - j]
                macs += _conv_macs(h, w, 3, neck if j == 0 else head, head)
    macs += _conv_macs(*sizes[0], 1, head, num_classes)  # conv_seg
    return int(macs)


def count_detection_macs(
    name: str, image_size: tuple[int, int] | int = (800, 1344), num_classes: int = 80, **overrides
) -> int:
    """MACs of one inference pass (backbone + FPN + RetinaHead at every level) of one image of
    `image_size` (H, W, multiples of 32) through a registered detection model."""
    model = create_model(name, num_classes, **overrides)
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    macs = count_macs(
        'crossformer_small',  # any variant: every architecture field is given
        (height, width),
        features_only=True,
        **{k: getattr(model, k) for k in ARCHITECTURE_FIELDS},
    )
    fpn, head = model.fpn_channels, model.head_channels
    levels = model.anchor_generator.feature_sizes(height, width)
    channels = [model.embed_dim * 2**s for s in (1, 2, 3)]
    for (h, w), c in zip(levels, channels):  # laterals and output convs on backbone stages 1..3
        macs += _conv_macs(h, w, 1, c, fpn) + _conv_macs(h, w, 3, fpn, fpn)
    macs += _conv_macs(*levels[3], 3, channels[-1], fpn)  # extra level on the last backbone map
    macs += _conv_macs(*levels[4], 3, fpn, fpn)
    anchors = model.anchor_generator.num_anchors
    for h, w in levels:
        for tower_out in (anchors * num_classes, anchors * 4):
            width_in = fpn
            for _ in range(model.num_head_convs):
                macs += _conv_macs(h, w, 3, width_in, head)
                width_in = head
            macs += _conv_macs(h, w, 3, width_in, tower_out)
    return int(macs)


def model_macs(
    name: str, image_size: tuple[int, int] | int, num_classes: int | None = None, **overrides
) -> int:
    """MACs of one inference pass of one image through any registered model: `count_macs` for a
    classifier, `count_segmentation_macs` for a segmentation model, `count_detection_macs` for a
    detector."""
    spec = model_spec(name)
    num_classes = spec.num_classes if num_classes is None else num_classes
    if spec.task == 'segmentation':
        return count_segmentation_macs(name, image_size, num_classes, **overrides)
    if spec.task == 'detection':
        return count_detection_macs(name, image_size, num_classes, **overrides)
    if spec.task != 'classification':
        raise ValueError(f'{name}: MACs of {spec.task} models are not counted yet')
    return count_macs(name, image_size, num_classes, **overrides)


def segmentation_report(image_sizes=(512, 1024), num_classes: int = 150) -> list[dict]:
    """Parameters and inference GMACs of every segmentation model at each square image size."""
    return [
        dict(
            model=name,
            params=count_params(name, num_classes),
            gmacs={s: count_segmentation_macs(name, s, num_classes) / 1e9 for s in image_sizes},
        )
        for name in SEGMENTATION_VARIANTS
    ]


def report(image_size: int = 224, num_classes: int = 1000) -> list[dict]:
    """Parameters and GMACs of every variant: [{'model', 'params', 'gmacs'}]."""
    return [
        dict(
            model=name,
            params=count_params(name, num_classes),
            gmacs=count_macs(name, image_size, num_classes) / 1e9,
        )
        for name in VARIANTS
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        '--segmentation',
        action='store_true',
        help='report the segmentation models (default sizes 512 and 1024, 150 classes)',
    )
    parser.add_argument('--image-size', type=int, action='append', default=None)
    parser.add_argument('--num-classes', type=int, default=None)
    args = parser.parse_args(argv)
    if args.segmentation:
        sizes = args.image_size or [512, 1024]
        header = ''.join(f'{"GMACs@" + str(s):>13}' for s in sizes)
        print(f'{"model":<30} {"params":>12}{header}')
        for row in segmentation_report(tuple(sizes), args.num_classes or 150):
            gmacs = ''.join(f'{row["gmacs"][s]:>13.1f}' for s in sizes)
            print(f'{row["model"]:<30} {row["params"]:>12,}{gmacs}')
        return
    args.image_size = args.image_size[-1] if args.image_size else 224
    args.num_classes = args.num_classes or 1000
    print(f'{"model":<22} {"params":>12} {"GMACs@" + str(args.image_size):>12}')
    for row in report(args.image_size, args.num_classes):
        print(f'{row["model"]:<22} {row["params"]:>12,} {row["gmacs"]:>12.2f}')


if __name__ == '__main__':
    main()
