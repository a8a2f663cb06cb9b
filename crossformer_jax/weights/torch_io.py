"""Reading PyTorch checkpoints (.pth) without trusting them, and finding the state dict inside.

read_torch_checkpoint(path)         -> the object in the file (weights-only unpickling)
extract_state_dict(checkpoint)      -> (state_dict, skipped_keys)
checkpoint_class_names(checkpoint)  -> the class names in an MMDetection / MMSegmentation meta
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

# Top-level prefixes of the heads in MMSegmentation checkpoints (next to `backbone.`).
SEGMENTATION_PREFIXES = ('decode_head.', 'auxiliary_head.', 'neck.')
# Top-level prefixes of the heads in MMDetection checkpoints: RetinaNet, (Cascade) Mask R-CNN.
DETECTION_PREFIXES = ('bbox_head.', 'rpn_head.', 'roi_head.')


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or an object that holds no usable state dict."""


def natural_key(key: str):
    """Sort key that orders 'layers.10' after 'layers.9'."""
    return [int(part) if part.isdigit() else part for part in re.split(r'(\d+)', key)]


# -------------------------------------------------------------------------------------------------
# Reading checkpoint files and finding the state dict inside.


def summarise_load_error(error: BaseException) -> str:
    """One line saying why torch.load refused a file."""
    text = str(error)
    if isinstance(error, IsADirectoryError):
        return 'is a directory, not a checkpoint file'
    if isinstance(error, FileNotFoundError):
        return 'no such file'
    if isinstance(error, PermissionError):
        return 'permission denied'
    if isinstance(error, EOFError):
        return 'file is empty or ends too early (not a complete PyTorch checkpoint)'
    if 'Weights only load failed' in text:
        match = re.search(r'GLOBAL ([\w.]+)', text)
        if match:
            return (
                f'refused to unpickle {match.group(1)}: the file holds objects other than '
                'tensors and plain containers, which could run code when loaded; only '
                'weights-only checkpoints are read (re-save just the state dict with '
                'torch.save if you trust the file)'
            )
        match = re.search(r'Unsupported operand (\d+)', text)
        if match:
            return (
                'not a PyTorch checkpoint (weights-only unpickling rejected pickle opcode '
                f'{match.group(1)})'
            )
        return 'weights-only unpickling rejected the file (not a plain tensor checkpoint)'
    if 'failed finding central directory' in text or 'PytorchStreamReader' in text:
        return 'corrupt or truncated PyTorch checkpoint (its zip archive cannot be read)'
    first = text.strip().splitlines()[0][:200] if text.strip() else ''
    detail = f'{type(error).__name__}: {first}' if first else type(error).__name__
    if isinstance(error, OSError):
        return detail
    # Anything else comes from torch.load's readers choking on a file of another format.
    return f'not a PyTorch checkpoint (unrecognised file format; {detail})'


def read_torch_checkpoint(path: str | os.PathLike) -> Any:
    """Loads a .pth/.pt file with `torch.load(weights_only=True)` onto the CPU.

    Weights-only unpickling never runs code from the file. Any failure (missing, empty, truncated,
    not a checkpoint, holding arbitrary Python objects) raises `CheckpointError` with the path and a
    one-line reason.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f'cannot read checkpoint {path}: no such file')
    if os.path.isdir(path):
        raise CheckpointError(
            f'cannot read checkpoint {path}: is a directory, not a checkpoint file'
        )
    if os.path.getsize(path) == 0:
        raise CheckpointError(f'cannot read checkpoint {path}: file is empty')
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a declared optional dependency
        raise CheckpointError(
            f'cannot read checkpoint {path}: reading .pth files needs PyTorch '
            '(pip install crossformer_jax[torch])'
        ) from e
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise CheckpointError(f'cannot read checkpoint {path}: {summarise_load_error(e)}') from e


def is_array(value: Any) -> bool:
    return hasattr(value, 'shape') and hasattr(value, 'dtype')


def strip_module_prefix(key: str) -> str:
    while key.startswith('module.'):
        key = key[len('module.') :]
    return key


def extract_state_dict(
    checkpoint: Any, keep_heads: bool = False
) -> tuple[dict[str, Any], list[str]]:
    """Finds the model's state dict inside a loaded checkpoint object.

    Accepted layouts: {'model': sd} (classification releases, possibly with optimizer state and
    such next to it), {'state_dict': sd} (detection/segmentation releases: the `backbone.*` keys are
    kept with the prefix removed, all others are returned as skipped), and a bare state dict. A
    DataParallel `module.` prefix is removed. With keep_heads, a segmentation state dict (keys
    under decode_head. / auxiliary_head. / neck.) or a detection state dict (bbox_head.,
    rpn_head., roi_head.) is returned whole, prefixes kept, for the segmentation / detection
    model. Returns (state_dict, skipped_keys).
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(
            f'checkpoint holds a {type(checkpoint).__name__}, not a dict of tensors'
        )
    if isinstance(checkpoint.get('model'), Mapping):
        state_dict = checkpoint['model']
    elif isinstance(checkpoint.get('state_dict'), Mapping):
        state_dict = checkpoint['state_dict']
    elif checkpoint and any(is_array(v) for v in checkpoint.values()):
        state_dict = checkpoint
    else:
        keys = ', '.join(repr(k) for k in list(checkpoint)[:10]) or 'none'
        raise CheckpointError(
            'no state dict found in the checkpoint: expected a dict of tensors, '
            f"or one under 'model' or 'state_dict'; top-level keys: {keys}"
        )
    stripped: dict[str, Any] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise CheckpointError(f'state dict key {key!r} is not a string')
        new_key = strip_module_prefix(key)
        if new_key in stripped:
            raise CheckpointError(f'state dict has {new_key!r} twice (with and without "module.")')
        stripped[new_key] = value
    if keep_heads and (is_segmentation_state_dict(stripped) or is_detection_state_dict(stripped)):
        return stripped, []
    if any(k.startswith('backbone.') for k in stripped):
        backbone = {
            k[len('backbone.') :]: v for k, v in stripped.items() if k.startswith('backbone.')
        }
        skipped = sorted((k for k in stripped if not k.startswith('backbone.')), key=natural_key)
        return backbone, skipped
    return stripped, []


def checkpoint_class_names(checkpoint: Any) -> list[str] | None:
    """The class names an MMDetection / MMSegmentation checkpoint records (meta['CLASSES']), or
    None when it has none (or something other than a list of strings there)."""
    meta = checkpoint.get('meta') if isinstance(checkpoint, Mapping) else None
    names = meta.get('CLASSES') if isinstance(meta, Mapping) else None
    if isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names):
        return list(names)
    return None


def is_detection_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """True for a whole MMDetection model: head keys (`bbox_head.` for RetinaNet, `rpn_head.` /
    `roi_head.` for (Cascade) Mask R-CNN) next to `backbone.` and `neck.`."""
    return any(strip_module_prefix(k).startswith(DETECTION_PREFIXES) for k in state_dict)


def is_segmentation_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """True for a whole MMSegmentation model (head keys next to `backbone.`, no `bbox_head.`)."""
    return not is_detection_state_dict(state_dict) and any(
        strip_module_prefix(k).startswith(SEGMENTATION_PREFIXES) for k in state_dict
    )
