"""The command line of convert_torch_weights.py: a PyTorch checkpoint (.pth) -> a pretrained
directory, optionally verified against the PyTorch reference.

Classifiers, backbones, MMSegmentation models (UPerNet / Semantic FPN) and MMDetection models
(RetinaNet, Mask R-CNN, Cascade Mask R-CNN) convert; the model is inferred from the weights unless
--model names it."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import jax

from crossformer_jax.cli import args as args_lib
from crossformer_jax.weights.convert import (
    ModelNameError,
    StateDictMismatchError,
    check_model_name,
    convert_with_report,
    infer_model_name,
    is_detection_name,
    is_segmentation_name,
)
from crossformer_jax.weights.pretrained import PretrainedError, check_replaceable, save_pretrained
from crossformer_jax.weights.torch_io import (
    checkpoint_class_names,
    extract_state_dict,
    read_torch_checkpoint,
)

# --verify's defaults: classifiers and segmentation models at one size, within 1e-4; detection
# models at two sizes, within 1e-5 (crossformer_jax.weights.verify's DETECTION_* values).
DEFAULT_TOLERANCE = 1e-4
DEFAULT_IMAGE_SIZES = ((224, 224),)


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='convert_torch_weights.py',
        description='Convert a PyTorch CrossFormer / CrossFormer++ checkpoint (.pth) into a '
        'crossformer_jax pretrained directory (orbax checkpoint + metadata).',
    )
    parser.add_argument(
        '--checkpoint',
        required=True,
        help="PyTorch checkpoint: {'model': sd}, {'state_dict': sd} (MMDetection / "
        'MMSegmentation, or a backbone under backbone.*) or a bare state dict; read with '
        'weights-only unpickling',
    )
    parser.add_argument(
        '--model',
        default=None,
        help='variant name (e.g. crossformer_small, retinanet_crossformer_small); inferred '
        'from the weights when omitted; a backbone name converts the backbone of a detection / '
        'segmentation checkpoint',
    )
    parser.add_argument('--output', required=True, help='directory to write')
    parser.add_argument(
        '--overwrite',
        action='store_true',
        help='replace an existing output directory (only after the new one is complete)',
    )
    parser.add_argument(
        '--num-classes',
        type=args_lib.positive_int,
        default=None,
        help='classes of the head (default: read from the head: head.weight, '
        'decode_head.conv_seg.weight, bbox_head.retina_cls.weight, '
        'roi_head.bbox_head(.0).fc_cls.weight); an explicit value must match the checkpoint',
    )
    parser.add_argument(
        '--verify',
        action='store_true',
        help='compare against the PyTorch reference on a random input before '
        'writing; exit 1 if they differ by more than the tolerance',
    )
    parser.add_argument(
        '--tolerance',
        type=args_lib.positive_float,
        default=None,
        help='--verify fails when max|diff| > tolerance * max|reference| (default 1e-4; 1e-5 '
        "for detection models: RetinaNet's detections must also agree, boxes and scores within "
        "1e-4; (Cascade) Mask R-CNN's box and mask heads are compared on random RoIs)",
    )
    parser.add_argument(
        '--image-size',
        type=args_lib.image_size,
        nargs='+',
        default=None,
        help='input size(s) for --verify: SIZE or HEIGHTxWIDTH, multiples of 32, each checked '
        '(default 224; 224x320 and 256x256 for detection models)',
    )
    parser.add_argument(
        '--seed', type=int, default=0, help='seed of the --verify input (default 0)'
    )
    return parser


def _check_output_path(output: str, overwrite: bool) -> None:

    if os.path.lexists(output):
        if not overwrite:
            raise PretrainedError(f'output {output} already exists; pass --overwrite to replace it')
        check_replaceable(output)
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise PretrainedError(f'cannot write {output}: parent directory {parent} does not exist')


def run_cli(args: argparse.Namespace, out=None) -> int:
    """The conversion steps of the command line; raises ValueError/OSError on user errors."""

    def say(text: str = '') -> None:
        print(text, file=out or sys.stdout, flush=True)

    _check_output_path(args.output, args.overwrite)  # fail early, before the slow steps
    checkpoint = read_torch_checkpoint(args.checkpoint)
    # A segmentation / detection checkpoint converts whole unless --model names a backbone variant.
    keep_heads = (
        args.model is None or is_segmentation_name(args.model) or is_detection_name(args.model)
    )
    state_dict, skipped_outer = extract_state_dict(checkpoint, keep_heads=keep_heads)
    if args.model is None:
        name = infer_model_name(state_dict)
        say(f'inferred model: {name}')
    else:
        name = check_model_name(args.model)
    try:
        variables, report = convert_with_report(state_dict, name, num_classes=args.num_classes)
    except StateDictMismatchError as e:
        if args.model is not None:
            try:
                inferred = infer_model_name(state_dict)
            except ModelNameError:
                inferred = None
            if inferred is not None and inferred != name:
                e.args = (
                    f'{e}\n(the weights look like {inferred}; omit --model to use the '
                    'inferred variant)',
                )
        raise

    label_names = None if report.features_only else checkpoint_class_names(checkpoint)
    if label_names is not None and len(label_names) != report.num_classes:
        label_names = None  # names of another head (e.g. a backbone's pretraining)
    del checkpoint

    say(f'checkpoint: {args.checkpoint}')
    if is_segmentation_name(name) or is_detection_name(name):
        task = 'segmentation' if is_segmentation_name(name) else 'detection'
        kind = f'{task}, {report.num_classes} classes'
        if report.overrides:
            kind += f', head widths {report.overrides}'
    elif report.features_only:
        kind = 'backbone, 4 feature maps'
    else:
        kind = f'classifier, {report.num_classes} classes'

    say(f'model: {name} ({kind})')
    say(f'parameters: {report.num_params:,} in {len(jax.tree.leaves(variables))} arrays')
    skipped = skipped_outer + report.skipped_buffers
    if skipped:
        say(
            f'skipped keys: {len(skipped)}'
            + (f' ({len(skipped_outer)} outside the backbone)' if skipped_outer else '')
            + (
                f' ({len(report.skipped_buffers)} buffers that are not weights: attn.biases / '
                'attn.relative_position_index / num_batches_tracked)'
                if report.skipped_buffers
                else ''
            )
        )
        for key in skipped[:8]:
            say(f'  {key}')
        if len(skipped) > 8:
            say(f'  ... and {len(skipped) - 8} more')
    else:
        say('skipped keys: none')

    if label_names is not None:
        say(f'class names: {len(label_names)} from the checkpoint meta (CLASSES)')

    status = 0
    if args.verify:
        from crossformer_jax.weights import verify  # needs the torch extra

        detection = is_detection_name(name)
        tolerance = args.tolerance or (
            verify.DETECTION_TOLERANCE if detection else DEFAULT_TOLERANCE
        )
        sizes = args.image_size or (
            verify.DETECTION_IMAGE_SIZES if detection else DEFAULT_IMAGE_SIZES
        )
        for h, w in sizes:
            say(f'verifying against the PyTorch reference at {h}x{w} (seed {args.seed}) ...')
            comparisons = verify.compare_with_torch(
                state_dict,
                variables,
                name,
                num_classes=report.num_classes,
                features_only=report.features_only,
                image_size=(h, w),
                seed=args.seed,
                **report.overrides,
            )
            for c in comparisons:
                ok = c.passes(tolerance)
                limit = c.tolerance if c.tolerance is not None else tolerance
                if c.mismatch is not None:
                    say(f'  {c.label}: {c.mismatch} FAILED')
                else:
                    say(
                        f'  {c.label} {c.shape}: max|diff| {c.max_abs_diff:.3e}, max|reference| '
                        f'{c.max_abs_reference:.3e}, relative {c.relative:.3e} '
                        f'{"ok" if ok else "FAILED"} (tolerance {limit:g})'
                    )
                if not ok:
                    status = 1
        if status:
            print(
                f'error: verification failed (relative difference above {tolerance:g}, or '
                f'detections that differ); nothing written to {args.output}',
                file=sys.stderr,
                flush=True,
            )
            return status
        say('verification passed')

    save_pretrained(
        args.output,
        variables,
        model_name=name,
        num_classes=report.num_classes,
        features_only=report.features_only,
        overwrite=args.overwrite,
        model_overrides=report.overrides,
        label_names=label_names,
        extra_metadata={
            'source_file': os.path.abspath(args.checkpoint),
            'skipped_keys': len(skipped),
        },
    )
    say(f'wrote {args.output}')
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of convert_torch_weights.py; returns the exit status (0 ok, 1 verification
    failed, 2 user error: message on stderr, no traceback)."""
    parser = build_arg_parser()
    args = parser.parse_args(argv)  # exits with status 2 and a usage message on bad arguments
    try:
        return run_cli(args)
    except (ValueError, OSError) as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print('interrupted; nothing written', file=sys.stderr, flush=True)
        return 130
