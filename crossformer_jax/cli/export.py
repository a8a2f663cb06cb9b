"""The command line of export_torch_weights.py: crossformer_jax weights -> a PyTorch checkpoint.

python export_torch_weights.py --weights PATH --output model.pth [--backbone] [--overwrite]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from crossformer_jax.weights.convert import DERIVED_BUFFER_SUFFIXES
from crossformer_jax.weights.export import (
    check_output_path,
    detection_meta,
    save_torch_checkpoint,
    torch_checkpoint,
)
from crossformer_jax.weights.loading import load_weights


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='export_torch_weights.py',
        description='Write crossformer_jax weights as a PyTorch checkpoint in the original '
        "layouts ({'model': ...} for a classifier, {'state_dict': {'backbone.*': ...}} for a "
        "backbone, MMSegmentation's {'state_dict': ...} for a segmentation model, "
        "MMDetection's {'state_dict': ..., 'meta': ...} for a detection model).",
    )
    parser.add_argument(
        '--weights',
        required=True,
        help='a pretrained directory (convert_torch_weights.py) or a train.py workdir '
        '(its best checkpoint is used)',
    )
    parser.add_argument('--output', required=True, help='the .pth file to write')
    parser.add_argument(
        '--backbone',
        action='store_true',
        help="write a model's backbone only, as a detection / segmentation checkpoint",
    )
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output file')
    return parser


def run_cli(args: argparse.Namespace, out=None) -> int:
    def say(text: str) -> None:
        print(text, file=out or sys.stdout, flush=True)

    check_output_path(args.output, args.overwrite)  # fail early, before loading
    weights = load_weights(args.weights)
    checkpoint = torch_checkpoint(
        weights.model,
        weights.variables,
        backbone=args.backbone,
        meta=detection_meta(weights.model_name, weights.label_names),
    )
    layout = 'model' if 'model' in checkpoint else 'state_dict'
    state_dict = checkpoint[layout]
    output = save_torch_checkpoint(checkpoint, args.output, overwrite=args.overwrite)
    buffers = sum(key.endswith(DERIVED_BUFFER_SUFFIXES) for key in state_dict)
    say(f'weights: {weights.source} ({weights.model_name})')
    say(
        f"wrote {output}: {{'{layout}': {len(state_dict)} tensors"
        + (f', {buffers} of them derived buffers' if buffers else '')
        + (", 'meta'" if 'meta' in checkpoint else '')
        + '}'
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of export_torch_weights.py: 0 on success, 2 on a user error (message on
    stderr, nothing written)."""
    args = build_arg_parser().parse_args(argv)
    try:
        return run_cli(args)
    except (ValueError, OSError) as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        return 2
