"""The command line of predict.py.

    python predict.py --weights PATH IMAGE_OR_FOLDER... [--top-k 5] [--json] [--batch-size 32]
        [--mask-dir masks] [--box-dir detections] [--score-threshold 0.3]

PATH is a pretrained directory (convert_torch_weights.py, save_pretrained) or a train.py workdir
(its best checkpoint); crossformer_jax.inference.predict says what is printed or written:
classifiers print the top-k classes, segmentation models write masks into --mask-dir, detection
models (RetinaNet) print their boxes scoring at least --score-threshold and draw them into
--box-dir, and Mask R-CNN models do the same with each box's mask (its area printed, COCO RLE in
--json, filled on the drawn copy).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TextIO

from crossformer_jax.cli import args as args_lib
from crossformer_jax.inference.predict import ImageError, Predictor, list_images
from crossformer_jax.weights.loading import load_weights


def probability(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a number, got {text!r}') from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f'expected a number in [0, 1], got {text!r}')
    return value


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='predict.py',
        description='Top-k classes (classifiers), masks (segmentation models), boxes (detection '
        'models) or boxes and instance masks (Mask R-CNN) of images with a converted checkpoint '
        'or a train.py workdir.',
    )
    parser.add_argument(
        '--weights',
        required=True,
        help='a pretrained directory (convert_torch_weights.py) or a train.py workdir '
        '(its best checkpoint is used)',
    )
    parser.add_argument('images', nargs='+', help='image files or folders (searched recursively)')
    parser.add_argument(
        '--top-k', type=args_lib.positive_int, default=5, help='classifiers: classes per image (5)'
    )
    parser.add_argument(
        '--batch-size', type=args_lib.positive_int, default=32, help='images per device batch (32)'
    )
    parser.add_argument(
        '--json',
        action='store_true',
        help='one JSON object per line (Mask R-CNN: each mask as COCO RLE with its area)',
    )
    parser.add_argument(
        '--mask-dir',
        default='masks',
        help='segmentation models: folder for the colour-coded mask PNGs (masks)',
    )
    parser.add_argument(
        '--box-dir',
        default='detections',
        help='detection and Mask R-CNN models: folder for the images with their boxes (and masks) '
        'drawn, as PNGs; existing files are kept, a new name gets a _1, _2... suffix (detections)',
    )
    parser.add_argument(
        '--score-threshold',
        type=probability,
        default=0.3,
        help='detection and Mask R-CNN models: least score of a box printed and drawn (0.3; '
        "boxes under the model's own 0.05 are never reported)",
    )
    return parser


def run_cli(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    weights = load_weights(args.weights)
    predictor = Predictor(
        weights,
        batch_size=args.batch_size,
        top_k=args.top_k,
        mask_dir=args.mask_dir,
        box_dir=args.box_dir,
        score_threshold=args.score_threshold,
    )
    failures = 0
    for result in predictor.run(list_images(args.images)):
        if isinstance(result, ImageError):
            failures += 1
            print(f'error: {result.path}: {result.message}', file=err, flush=True)
        elif args.json:
            print(json.dumps(result.to_json()), file=out, flush=True)
        else:
            print(result.to_text(), file=out, flush=True)
    if failures:
        print(f'{failures} image(s) could not be used', file=err, flush=True)
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of predict.py: 0 when every image was predicted, 1 when some could not be
    read, 2 on a usage error or unusable weights (message on stderr)."""
    args = build_arg_parser().parse_args(argv)
    try:
        return run_cli(args, sys.stdout, sys.stderr)
    except (ValueError, OSError) as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        return 2
