"""Flax weights back to PyTorch checkpoints in the original layouts (the command line is
crossformer_jax.cli.export, run as export_torch_weights.py).

Layouts written:

* classifier: `{'model': state_dict}` as the original classification checkpoints, including, for
  CrossFormer (v1), the two derived buffers of every block (`attn.biases`: the relative offsets
  of its group, ((2Gh-1)(2Gw-1), 2) float32, dh outer; `attn.relative_position_index`: the
  offset row of each (query, key) pair, (Gh*Gw, Gh*Gw) int64), with the group each block has on
  a 224 x 224 input, so that the original code loads the file with strict=True;
* backbone (a features_only model, or a classifier with --backbone): `{'state_dict':
  {'backbone.<key>': ...}}` as the detection / segmentation checkpoints (no norm, no head, no
  derived buffers);
* segmentation model (crossformer_jax.models.segmentation): `{'state_dict': ...}` in
  MMSegmentation's
  names (`backbone.`, `decode_head.`, `auxiliary_head.` or `neck.`, BatchNorm running statistics
  and num_batches_tracked included); with --backbone only its `backbone.` part;
* detection model (RetinaNet, crossformer_jax.models.detection; (Cascade) Mask R-CNN,
  crossformer_jax.models.mask_rcnn): `{'state_dict': ..., 'meta': ...}` as MMDetection 2.x writes
  them (`backbone.`, `neck.`, and `bbox_head.` or `rpn_head.` and `roi_head.`, a Cascade model's
  BatchNorm running statistics and num_batches_tracked included), the meta saying what wrote
  the file (`detection_meta`: the class names under 'CLASSES' when known); with --backbone only
  the `backbone.` part.

Parameter names and layouts follow docs/parameter_names.md (`convert.flax_to_torch_state_dict`);
converting the written file back gives bitwise the same Flax parameters. The file is written to a
temporary sibling and renamed into place, so an existing file is only replaced, with --overwrite,
by a complete new one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from crossformer_jax.models.crossformer import group_layout, relative_offsets
from crossformer_jax.models.detection import RetinaNet
from crossformer_jax.models.mask_rcnn import MaskRCNN
from crossformer_jax.models.segmentation import SegmentationModel
from crossformer_jax.weights import convert

BUFFER_IMAGE_SIZE = 224  # the original classification code sizes its buffers for this input
BACKBONE_PREFIX = 'backbone.'


class ExportError(ValueError):
    """The weights cannot be exported as asked, or the output cannot be written."""


def v1_derived_buffers(model) -> dict[str, np.ndarray]:
    """`layers.S.blocks.J.attn.biases` / `.relative_position_index` of every block of a v1 model:
    the group of each block on a 224 x 224 input (token grid 224 / 2^(S+2))."""
    buffers = {}
    for stage, depth in enumerate(model.depths):
        grid = BUFFER_IMAGE_SIZE // 2 ** (stage + 2)
        for block in range(depth):
            layout = group_layout(
                grid,
                grid,
                group_size=model.group_size[stage],
                interval=model.interval[stage],
                long_distance=block % 2 == 1,
                version='v1',
            )
            offsets, index = relative_offsets(*layout.group)
            prefix = f'layers.{stage}.blocks.{block}.attn.'
            buffers[prefix + 'biases'] = offsets.astype(np.float32)
            buffers[prefix + 'relative_position_index'] = index.astype(np.int64)
    return buffers


def detection_meta(
    model_name: str | None = None, label_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """The 'meta' of an exported detection checkpoint: what wrote it (exporter and converter
    version), the model name when known, and the class names as MMDetection's 'CLASSES'."""
    meta: dict[str, Any] = {
        'exported_by': 'crossformer_jax (export_torch_weights.py)',
        'converter_version': convert.CONVERTER_VERSION,
    }
    if model_name is not None:
        meta['model_name'] = model_name
    if label_names is not None:
        meta['CLASSES'] = tuple(str(name) for name in label_names)
    return meta


def torch_checkpoint(
    model,
    variables: Mapping[str, Any],
    *,
    backbone: bool,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint dict (numpy arrays) of a Flax CrossFormer in the original layout; `meta`
    (strings, numbers and sequences of them) goes with a detection model's state dict (default:
    `detection_meta()`)."""
    state_dict = convert.flax_to_torch_state_dict(variables)
    if isinstance(model, (SegmentationModel, RetinaNet, MaskRCNN)):
        if backbone:
            return {
                'state_dict': {k: v for k, v in state_dict.items() if k.startswith(BACKBONE_PREFIX)}
            }
        if isinstance(model, (RetinaNet, MaskRCNN)):  # MMDetection: backbone., neck., heads
            return {'state_dict': state_dict, 'meta': dict(meta or detection_meta())}
        return {'state_dict': state_dict}  # MMSegmentation: backbone., decode_head., ...
    if backbone or model.features_only:
        return {
            'state_dict': {
                BACKBONE_PREFIX + key: value
                for key, value in state_dict.items()
                if not key.startswith(('norm.', 'head.'))
            }
        }
    if model.version == 'v1':
        state_dict.update(v1_derived_buffers(model))
    return {'model': state_dict}


def _as_torch(tree: Any) -> Any:
    """Arrays -> torch tensors, in nested dicts; anything else (a meta's strings) as it is."""
    import torch

    if isinstance(tree, Mapping):
        return {key: _as_torch(value) for key, value in tree.items()}
    if isinstance(tree, (np.ndarray, np.generic)):
        return torch.tensor(np.asarray(tree))  # a copy: the arrays may be read-only
    return tree


def check_output_path(output: str, overwrite: bool) -> str:
    """The absolute output path; ExportError if it exists (without overwrite), is a directory, or
    its parent directory is missing."""
    output = os.path.abspath(output)
    if os.path.isdir(output):
        raise ExportError(f'{output} is a directory; give a file name such as model.pth')
    if os.path.lexists(output) and not overwrite:
        raise ExportError(f'{output} already exists; pass --overwrite to replace it')
    parent = os.path.dirname(output)
    if not os.path.isdir(parent):
        raise ExportError(f'cannot write {output}: parent directory {parent} does not exist')
    return output


def save_torch_checkpoint(checkpoint: Mapping[str, Any], output: str, *, overwrite: bool) -> str:
    """torch.save of `checkpoint` (numpy leaves become tensors) to `output`, atomically."""
    import torch

    output = check_output_path(output, overwrite)
    parent, base = os.path.split(output)
    fd, tmp = tempfile.mkstemp(prefix=f'.{base}.tmp-', dir=parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(_as_torch(checkpoint), f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        if os.path.lexists(output) and not overwrite:  # appeared while writing
            raise ExportError(f'{output} already exists; pass --overwrite to replace it')
        os.replace(tmp, output)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    return output
