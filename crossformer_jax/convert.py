"""Conversion of PyTorch CrossFormer / CrossFormer++ checkpoints to Flax parameters.

The mapping between PyTorch state-dict keys and the Flax parameter tree is the one fixed in
docs/parameter_names.md. Rather than hard-coding every key, the converter derives the expected
PyTorch keys and shapes from the Flax model itself (`jax.eval_shape` of `create_model(...).init`,
so no memory is allocated) and then checks the given state dict against them: every missing key,
every unused key and every shape mismatch is reported together in one `StateDictMismatchError`.

Library entry points:

    read_torch_checkpoint(path)            -> the object in a .pth file (weights-only unpickling)
    extract_state_dict(checkpoint)         -> (state_dict, skipped_keys)
    infer_model_name(state_dict)           -> registered variant name
    convert_torch_state_dict(sd, name)     -> {'params': nested dict of float32 numpy arrays}
    compare_with_torch(...)                -> side-by-side check against the PyTorch reference
    main(argv)                             -> the command line of convert_torch_weights.py

PyTorch is only imported where needed (reading .pth files, verification); state dicts of numpy
arrays convert without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

CONVERTER_VERSION = '1'

# Non-learned buffers of the v1 classification checkpoints (derived from the group size) and
# BatchNorm's step counter (unused with a fixed momentum); the converter skips them.
DERIVED_BUFFER_SUFFIXES = ('.attn.biases', '.attn.relative_position_index', '.num_batches_tracked')

# Top-level prefixes of the heads in MMSegmentation checkpoints (next to `backbone.`).
SEGMENTATION_PREFIXES = ('decode_head.', 'auxiliary_head.', 'neck.')

# The input used to trace the model for its parameter shapes (which do not depend on it).
_TRACE_IMAGE_SIZE = 64


# -------------------------------------------------------------------------------------------------
# Errors.


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or an object that holds no usable state dict."""


class StateDictMismatchError(ValueError):
    """The state dict does not fit the model. Lists every offending key at once.

    Attributes: missing (keys the model needs), unexpected (keys the model has no use for),
    mismatched (key -> (expected PyTorch shape, found shape)), invalid (key -> description of a
    value that is not an array).
    """

    def __init__(
        self,
        model_description: str,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        mismatched: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None,
        expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
        found_shapes: Mapping[str, tuple[int, ...]] | None = None,
        invalid: Mapping[str, str] | None = None,
    ):
        self.missing = sorted(missing, key=_natural_key)
        self.unexpected = sorted(unexpected, key=_natural_key)
        self.mismatched = dict(
            sorted((mismatched or {}).items(), key=lambda kv: _natural_key(kv[0]))
        )
        self.invalid = dict(invalid or {})
        expected_shapes = expected_shapes or {}
        found_shapes = found_shapes or {}
        counts = []
        lines = []
        if self.missing:
            counts.append(f'{len(self.missing)} missing')
            lines.append('missing keys (expected shape):')
            lines += [f'  {k}  expected {_fmt_shape(expected_shapes.get(k))}' for k in self.missing]
        if self.unexpected:
            counts.append(f'{len(self.unexpected)} unexpected')
            lines.append('unexpected keys (found shape):')
            lines += [f'  {k}  found {_fmt_shape(found_shapes.get(k))}' for k in self.unexpected]
        if self.mismatched:
            counts.append(f'{len(self.mismatched)} with the wrong shape')
            lines.append('shape mismatches (PyTorch layout):')
            lines += [
                f'  {k}  expected {_fmt_shape(e)}, found {_fmt_shape(f)}'
                for k, (e, f) in self.mismatched.items()
            ]
        if self.invalid:
            counts.append(f'{len(self.invalid)} not arrays')
            lines.append('values that are not arrays:')
            lines += [f'  {k}  {desc}' for k, desc in self.invalid.items()]
        super().__init__(
            f'state dict does not match {model_description}: keys '
            f'{", ".join(counts)}\n' + '\n'.join(lines)
        )


def _fmt_shape(shape) -> str:
    if shape is None:
        return '?'
    return '(' + ', '.join(str(int(d)) for d in shape) + ')'


def _natural_key(key: str):
    """Sort 'layers.10' after 'layers.2'."""
    return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', key)]


# -------------------------------------------------------------------------------------------------
# Reading checkpoint files and finding the state dict inside.


def _summarise_load_error(error: BaseException) -> str:
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
        raise CheckpointError(f'cannot read checkpoint {path}: {_summarise_load_error(e)}') from e


def _is_array(value: Any) -> bool:
    return hasattr(value, 'shape') and hasattr(value, 'dtype')


def _strip_module_prefix(key: str) -> str:
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
    under decode_head. / auxiliary_head. / neck.) is returned whole, prefixes kept, for the
    segmentation model. Returns (state_dict, skipped_keys).
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(
            f'checkpoint holds a {type(checkpoint).__name__}, not a dict of tensors'
        )
    if isinstance(checkpoint.get('model'), Mapping):
        state_dict = checkpoint['model']
    elif isinstance(checkpoint.get('state_dict'), Mapping):
        state_dict = checkpoint['state_dict']
    elif checkpoint and any(_is_array(v) for v in checkpoint.values()):
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
        new_key = _strip_module_prefix(key)
        if new_key in stripped:
            raise CheckpointError(f'state dict has {new_key!r} twice (with and without "module.")')
        stripped[new_key] = value
    if keep_heads and is_segmentation_state_dict(stripped):
        return stripped, []
    if any(k.startswith('backbone.') for k in stripped):
        backbone = {
            k[len('backbone.') :]: v for k, v in stripped.items() if k.startswith('backbone.')
        }
        skipped = sorted((k for k in stripped if not k.startswith('backbone.')), key=_natural_key)
        return backbone, skipped
    return stripped, []


# -------------------------------------------------------------------------------------------------
# Key mapping between the Flax tree and the PyTorch state dict.


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One Flax variable and the PyTorch tensor it comes from."""

    path: tuple[str, ...]  # path under the collection
    flax_shape: tuple[int, ...]
    torch_shape: tuple[int, ...]
    kind: str  # 'linear', 'conv' or 'copy'
    collection: str = 'params'  # or 'batch_stats' (BatchNorm running statistics)


_DPB_SEQUENTIAL = re.compile(r'^(pos\d+)_(norm|linear)$')
_INDEXED = re.compile(r'^(.+?)((?:_\d+)+)$')
# BatchNorm running statistics: Flax batch_stats name -> PyTorch buffer name.
_BATCH_STATS_NAMES = {'mean': 'running_mean', 'var': 'running_var'}


def _torch_module_name(flax_name: str) -> str:
    """Flax module name -> PyTorch module path segment ('layers_0' -> 'layers.0',
    'psp_modules_0_1' -> 'psp_modules.0.1')."""
    match = _DPB_SEQUENTIAL.match(flax_name)
    if match:  # DPB's nn.Sequential(LayerNorm, ReLU, Linear): indices 0 and 2
        return f'{match.group(1)}.{0 if match.group(2) == "norm" else 2}'
    match = _INDEXED.match(flax_name)
    if match:
        return match.group(1) + match.group(2).replace('_', '.')
    return flax_name


def _leaf_from_flax(
    path: tuple[str, ...], shape: tuple[int, ...], collection: str = 'params'
) -> tuple[str, _Leaf]:
    *modules, leaf = path
    prefix = '.'.join(_torch_module_name(m) for m in modules)
    if collection == 'batch_stats' and leaf in _BATCH_STATS_NAMES:
        return f'{prefix}.{_BATCH_STATS_NAMES[leaf]}', _Leaf(path, shape, shape, 'copy', collection)
    if collection != 'params':
        raise NotImplementedError(f'no PyTorch counterpart for {collection} {"/".join(path)}')
    if leaf == 'kernel' and len(shape) == 2:  # Dense (in, out) <- Linear weight (out, in)
        return f'{prefix}.weight', _Leaf(path, shape, (shape[1], shape[0]), 'linear')
    if leaf == 'kernel' and len(shape) == 4:  # Conv (kh, kw, in, out) <- (out, in, kh, kw)
        return f'{prefix}.weight', _Leaf(
            path, shape, (shape[3], shape[2], shape[0], shape[1]), 'conv'
        )
    if leaf == 'scale':  # LayerNorm
        return f'{prefix}.weight', _Leaf(path, shape, shape, 'copy')
    if leaf == 'bias':
        return f'{prefix}.bias', _Leaf(path, shape, shape, 'copy')
    raise NotImplementedError(f'no PyTorch counterpart for Flax parameter {"/".join(path)} {shape}')


def _model_kwargs_key(num_classes: int, features_only: bool, overrides: Mapping[str, Any]):
    items = []
    for k, v in sorted(overrides.items()):
        items.append((k, tuple(v) if isinstance(v, list) else v))
    return (num_classes, features_only, tuple(items))


def expected_torch_shapes(
    name: str, *, num_classes: int = 1000, features_only: bool = False, **overrides
) -> dict[str, _Leaf]:
    """PyTorch key -> expected parameter of `create_model(name, ...)`, traced without allocation."""
    key = _model_kwargs_key(num_classes, features_only, overrides)
    try:
        hash(key)
    except TypeError:
        return _expected_torch_shapes(name, key, overrides)
    return _expected_torch_shapes_cached(name, key)


@functools.lru_cache(maxsize=32)
def _expected_torch_shapes_cached(name: str, key) -> dict[str, _Leaf]:
    return _expected_torch_shapes(name, key, dict(key[2]))


def _expected_torch_shapes(name: str, key, overrides: Mapping[str, Any]) -> dict[str, _Leaf]:
    import jax
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict

    from crossformer_jax.crossformer import create_model

    num_classes, features_only = key[0], key[1]
    model = create_model(name, num_classes=num_classes, features_only=features_only, **overrides)
    images = jax.ShapeDtypeStruct((1, _TRACE_IMAGE_SIZE, _TRACE_IMAGE_SIZE, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    if not set(shapes) <= {'params', 'batch_stats'}:
        raise NotImplementedError(f'unexpected variable collections {sorted(shapes)}')
    table = {}
    for collection in sorted(shapes, key=lambda c: c != 'params'):
        for path, leaf in flatten_dict(shapes[collection]).items():
            torch_key, entry = _leaf_from_flax(tuple(path), tuple(leaf.shape), collection)
            if torch_key in table:
                raise NotImplementedError(f'two Flax variables map to {torch_key}')
            table[torch_key] = entry
    return table


def _to_numpy(value: Any) -> np.ndarray:
    """A torch tensor or array-like -> float32 numpy array (on the CPU, detached)."""
    if hasattr(value, 'detach'):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        return np.array(value.numpy(), dtype=np.float32)
    return np.array(value, dtype=np.float32)


def is_derived_buffer(key: str) -> bool:
    return key.endswith(DERIVED_BUFFER_SUFFIXES)


def is_segmentation_name(name: str) -> bool:
    from crossformer_jax.segmentation import SEGMENTATION_VARIANTS

    return name in SEGMENTATION_VARIANTS


def is_segmentation_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """True for a whole MMSegmentation model (head keys next to `backbone.`)."""
    return any(_strip_module_prefix(k).startswith(SEGMENTATION_PREFIXES) for k in state_dict)


def convert_torch_state_dict(
    state_dict: Mapping[str, Any],
    name: str,
    *,
    num_classes: int | None = None,
    features_only: bool | None = None,
    **overrides,
) -> dict[str, Any]:
    """PyTorch state dict -> Flax variables {'params': nested dict of float32 numpy arrays}, plus
    'batch_stats' (BatchNorm running statistics) for segmentation models.

    Values may be torch tensors or numpy arrays; `module.` prefixes are removed. Unless given,
    `features_only` is True when the state dict has no `head.*` keys and `num_classes` is read from
    `head.weight` (`decode_head.conv_seg.weight` for segmentation models, whose head widths come
    from `segmentation_overrides` unless given). `overrides` go to `create_model` (e.g. reduced
    depths in tests). The derived buffers `attn.biases` / `attn.relative_position_index` and
    BatchNorm's `num_batches_tracked` are ignored; any other unused key, any missing key and any
    shape mismatch raise one `StateDictMismatchError` that lists them all.
    """
    variables, _ = convert_with_report(
        state_dict, name, num_classes=num_classes, features_only=features_only, **overrides
    )
    return variables


@dataclasses.dataclass
class ConversionReport:
    model_name: str
    num_classes: int | None  # None for a backbone
    features_only: bool
    num_params: int
    skipped_buffers: list[str]  # derived buffers that were ignored
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # create_model's


def _describe_model(name: str, num_classes: int, features_only: bool, overrides) -> str:
    if is_segmentation_name(name):
        what = f'segmentation model with {num_classes} classes'
    elif features_only:
        what = 'backbone (features_only)'
    else:
        what = f'classifier with {num_classes} classes'
    extra = f', overrides {dict(overrides)}' if overrides else ''
    return f'{name} {what}{extra}'


def _prepare(state_dict, name, num_classes, features_only, overrides):
    """Validates a state dict against the model; returns (state_dict, expected, report)."""
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f'expected a state dict (a mapping), got {type(state_dict).__name__}')
    state_dict = {_strip_module_prefix(k): v for k, v in state_dict.items()}
    if is_segmentation_name(name):
        if features_only:
            raise ValueError(f'{name} is a segmentation model; features_only does not apply')
        features_only = False
        overrides = {**segmentation_overrides(state_dict, name), **overrides}
        if num_classes is None:
            conv_seg = _shape_of(state_dict, 'decode_head.conv_seg.weight')
            num_classes = conv_seg[0] if conv_seg else 150
    if features_only is None:
        features_only = not any(k.startswith('head.') for k in state_dict)
    if num_classes is None:
        head = state_dict.get('head.weight')
        num_classes = (
            int(head.shape[0])
            if (not features_only and _is_array(head) and len(head.shape) == 2)
            else 1000
        )
    expected = expected_torch_shapes(
        name, num_classes=num_classes, features_only=features_only, **overrides
    )

    skipped = sorted(
        (k for k in state_dict if is_derived_buffer(k) and k not in expected), key=_natural_key
    )
    found_shapes, invalid = {}, {}
    for k, v in state_dict.items():
        if _is_array(v):
            found_shapes[k] = tuple(int(d) for d in v.shape)
        elif k not in skipped:
            invalid[k] = f'{type(v).__name__} value'
    missing = [k for k in expected if k not in state_dict]
    unexpected = [
        k for k in state_dict if k not in expected and k not in skipped and k not in invalid
    ]
    mismatched = {
        k: (e.torch_shape, found_shapes[k])
        for k, e in expected.items()
        if k in found_shapes and found_shapes[k] != e.torch_shape
    }
    if missing or unexpected or mismatched or invalid:
        raise StateDictMismatchError(
            _describe_model(name, num_classes, features_only, overrides),
            missing,
            unexpected,
            mismatched,
            {k: e.torch_shape for k, e in expected.items()},
            found_shapes,
            invalid,
        )
    report = ConversionReport(
        name,
        None if features_only else num_classes,
        features_only,
        int(sum(math.prod(e.torch_shape) for e in expected.values() if e.collection == 'params')),
        skipped,
        dict(overrides),
    )
    return state_dict, expected, report


def check_torch_state_dict(
    state_dict: Mapping[str, Any],
    name: str,
    *,
    num_classes: int | None = None,
    features_only: bool | None = None,
    **overrides,
) -> ConversionReport:
    """Checks keys and shapes only (values may be meta tensors); raises StateDictMismatchError."""
    return _prepare(state_dict, name, num_classes, features_only, overrides)[2]


def convert_with_report(
    state_dict: Mapping[str, Any],
    name: str,
    *,
    num_classes: int | None = None,
    features_only: bool | None = None,
    **overrides,
) -> tuple[dict[str, Any], ConversionReport]:
    """`convert_torch_state_dict`, also returning a `ConversionReport`."""
    from flax.traverse_util import unflatten_dict

    state_dict, expected, report = _prepare(state_dict, name, num_classes, features_only, overrides)
    flat: dict[str, dict] = {}
    for k, e in expected.items():
        value = _to_numpy(state_dict[k])
        if e.kind == 'linear':
            value = value.T
        elif e.kind == 'conv':
            value = value.transpose(2, 3, 1, 0)
        flat.setdefault(e.collection, {})[e.path] = np.ascontiguousarray(value)
    return {collection: unflatten_dict(tree) for collection, tree in flat.items()}, report


def flax_to_torch_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inverse mapping: Flax variables -> PyTorch-named numpy arrays (without derived buffers).

    With 'batch_stats' (segmentation models) the result is an MMSegmentation state dict: every
    BatchNorm also gets running_mean / running_var and a num_batches_tracked of 0 (int64), which
    PyTorch's BatchNorm2d keeps in its state dict but does not use with a fixed momentum.
    """
    from flax.traverse_util import flatten_dict

    collections = {'params': variables.get('params', variables)}
    if 'batch_stats' in variables:
        collections['batch_stats'] = variables['batch_stats']
    out = {}
    for collection, tree in collections.items():
        for path, value in flatten_dict(tree).items():
            value = np.asarray(value, dtype=np.float32)
            torch_key, leaf = _leaf_from_flax(tuple(path), tuple(value.shape), collection)
            if leaf.kind == 'linear':
                value = value.T
            elif leaf.kind == 'conv':
                value = value.transpose(3, 2, 0, 1)
            out[torch_key] = np.ascontiguousarray(value)
            if torch_key.endswith('.running_mean'):
                counter = torch_key[: -len('running_mean')] + 'num_batches_tracked'
                out[counter] = np.zeros((), np.int64)
    return out


# -------------------------------------------------------------------------------------------------
# Working out the variant from a state dict.


class ModelNameError(ValueError):
    """The variant could not be worked out from a state dict, or an unknown name was given."""


_BLOCK_KEY = re.compile(r'^layers\.(\d+)\.blocks\.(\d+)\.')


def _shape_of(state_dict: Mapping[str, Any], key: str) -> tuple[int, ...] | None:
    value = state_dict.get(key)
    return tuple(int(d) for d in value.shape) if _is_array(value) else None


def describe_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture facts visible in a state dict: embed_dim, depths, heads, ACL, classes."""
    state_dict = {_strip_module_prefix(k): v for k, v in state_dict.items()}
    if any(k.startswith('backbone.') for k in state_dict):  # a detection/segmentation state dict
        state_dict = {
            k[len('backbone.') :]: v for k, v in state_dict.items() if k.startswith('backbone.')
        }
    norm = _shape_of(state_dict, 'patch_embed.norm.weight')
    blocks: dict[int, set[int]] = {}
    for key in state_dict:
        match = _BLOCK_KEY.match(key)
        if match:
            blocks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    stages = range(max(blocks) + 1) if blocks else range(0)
    depths = tuple(max(blocks[s]) + 1 if s in blocks else 0 for s in stages)
    heads = []
    for s in stages:
        shape = _shape_of(state_dict, f'layers.{s}.blocks.0.attn.pos.pos3.2.weight')
        heads.append(shape[0] if shape else None)
    head = _shape_of(state_dict, 'head.weight')
    return {
        'embed_dim': norm[0] if norm and len(norm) == 1 else None,
        'depths': depths,
        'num_heads': tuple(heads),
        'activation_cooling': any('.ex_conv.' in k for k in state_dict),
        'num_classes': head[0] if head else None,
    }


def infer_model_name(state_dict: Mapping[str, Any]) -> str:
    """The registered variant whose architecture matches the state dict.

    A segmentation state dict (decode_head.* keys) gives 'upernet_<backbone>' (psp_modules in the
    decode head) or 'fpn_<backbone>' (neck.* keys) for the backbone under backbone.*. Uses
    embed_dim (patch_embed.norm.weight), the number of blocks per stage, the heads of each
    stage (the DPB's last Linear) and the presence of ACL keys (ex_conv: CrossFormer++ only, which
    tells crossformer_base from crossformer_pp_base, crossformer_large from crossformer_pp_large).
    Raises `ModelNameError` listing what was found when no variant or several match.
    """
    from crossformer_jax.crossformer import VARIANTS

    if is_segmentation_state_dict(state_dict):
        return _infer_segmentation_name(state_dict)
    facts = describe_state_dict(state_dict)
    found = (
        f'embed_dim={facts["embed_dim"]}, depths={facts["depths"]}, '
        f'num_heads={facts["num_heads"]}, ACL (ex_conv) keys '
        f'{"present" if facts["activation_cooling"] else "absent"}'
    )
    if facts['embed_dim'] is None or not facts['depths']:
        raise ModelNameError(
            'cannot infer the model from the state dict: no '
            "'patch_embed.norm.weight' or no 'layers.*.blocks.*' keys "
            f'(is this a CrossFormer checkpoint?); found {found}'
        )
    matches = []
    for name, cfg in VARIANTS.items():
        if (
            cfg['embed_dim'] == facts['embed_dim']
            and tuple(cfg['depths']) == facts['depths']
            and (cfg['version'] == 'pp') == facts['activation_cooling']
            and all(h is None or h == c for h, c in zip(facts['num_heads'], cfg['num_heads']))
        ):
            matches.append(name)
    if len(matches) == 1:
        return matches[0]
    if not matches:
        known = '; '.join(
            f'{n}: embed_dim={c["embed_dim"]}, depths={tuple(c["depths"])}, '
            f'num_heads={tuple(c["num_heads"])}, ACL={c["version"] == "pp"}'
            for n, c in VARIANTS.items()
        )
        raise ModelNameError(
            f'no registered CrossFormer variant matches the state dict: found '
            f'{found}. Known variants: {known}'
        )
    raise ModelNameError(
        f'the state dict matches several variants ({", ".join(matches)}): found '
        f'{found}; pass the model name explicitly'
    )


def _infer_segmentation_name(state_dict: Mapping[str, Any]) -> str:
    from crossformer_jax.segmentation import SEGMENTATION_VARIANTS

    keys = [_strip_module_prefix(k) for k in state_dict]
    if any(k.startswith('decode_head.psp_modules.') for k in keys):
        head = 'upernet'
    elif any(k.startswith('neck.') for k in keys) and any(
        k.startswith('decode_head.scale_heads.') for k in keys
    ):
        head = 'fpn'
    else:
        raise ModelNameError(
            'cannot tell the segmentation head from the state dict: expected '
            "'decode_head.psp_modules.*' (UPerNet) or 'neck.*' with "
            "'decode_head.scale_heads.*' (Semantic FPN)"
        )
    backbone = {
        k[len('backbone.') :]: v
        for k, v in ((_strip_module_prefix(k), v) for k, v in state_dict.items())
        if k.startswith('backbone.')
    }
    if not backbone:
        raise ModelNameError('the segmentation state dict has no backbone.* keys')
    name = f'{head}_{infer_model_name(backbone)}'
    if name not in SEGMENTATION_VARIANTS:
        raise ModelNameError(
            f'the state dict looks like {name}, which is not a registered segmentation model '
            f'({", ".join(sorted(SEGMENTATION_VARIANTS))}); pass --model explicitly'
        )
    return name


def segmentation_overrides(state_dict: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Head widths of a segmentation state dict that differ from the registered model's
    (head_channels, aux_channels, neck_channels), read from the conv shapes; aux_channels None
    when a UPerNet state dict has no auxiliary_head.* keys."""
    from crossformer_jax.segmentation import segmentation_config

    state_dict = {_strip_module_prefix(k): v for k, v in state_dict.items()}
    default = segmentation_config(name)
    # Each width with the (key, axis) pairs that show it, the first present one is used.
    if default['head'] == 'upernet':
        sources = {
            'head_channels': [
                ('decode_head.bottleneck.conv.weight', 0),
                ('decode_head.bottleneck.bn.weight', 0),
                ('decode_head.conv_seg.weight', 1),
            ],
            'aux_channels': [
                ('auxiliary_head.convs.0.conv.weight', 0),
                ('auxiliary_head.convs.0.bn.weight', 0),
                ('auxiliary_head.conv_seg.weight', 1),
            ],
        }
    else:
        sources = {
            'head_channels': [
                ('decode_head.scale_heads.0.0.conv.weight', 0),
                ('decode_head.scale_heads.0.0.bn.weight', 0),
                ('decode_head.conv_seg.weight', 1),
            ],
            'neck_channels': [
                ('neck.lateral_convs.0.conv.weight', 0),
                ('neck.lateral_convs.0.conv.bias', 0),
                ('neck.fpn_convs.0.conv.weight', 0),
            ],
        }
    overrides = {}
    for field, candidates in sources.items():
        shapes = [_shape_of(state_dict, key) for key, _ in candidates]
        widths = [shape[axis] for shape, (_, axis) in zip(shapes, candidates) if shape]
        if widths:
            width = widths[0]
        elif field == 'aux_channels' and not any(
            k.startswith('auxiliary_head.') for k in state_dict
        ):
            width = None
        else:
            continue  # reported as missing keys by the conversion
        if width != default[field]:
            overrides[field] = width
    return overrides


def check_model_name(name: str) -> str:
    from crossformer_jax.crossformer import list_models

    if name not in list_models():
        raise ModelNameError(f'unknown model {name!r}; available: {", ".join(list_models())}')
    return name


# -------------------------------------------------------------------------------------------------
# Verification against the PyTorch reference.


@dataclasses.dataclass
class Comparison:
    label: str
    shape: tuple[int, ...]
    max_abs_diff: float
    max_abs_reference: float

    @classmethod
    def of(cls, label: str, reference: np.ndarray, output: np.ndarray) -> Comparison:
        """The comparison of two arrays of the same shape (RuntimeError naming both otherwise)."""
        if reference.shape != output.shape:
            raise RuntimeError(
                f'{label}: reference shape {reference.shape} != Flax shape {output.shape}'
            )
        return cls(
            label,
            reference.shape,
            float(np.max(np.abs(reference - output))),
            float(np.max(np.abs(reference))),
        )

    @property
    def relative(self) -> float:
        """max|diff| / max|reference|."""
        return self.max_abs_diff / max(self.max_abs_reference, np.finfo(np.float32).tiny)


def compare_with_torch(
    state_dict: Mapping[str, Any],
    variables: Mapping[str, Any],
    name: str,
    *,
    num_classes: int | None,
    features_only: bool,
    image_size: tuple[int, int] = (224, 224),
    batch_size: int = 1,
    seed: int = 0,
    **overrides,
) -> list[Comparison]:
    """Runs the PyTorch reference (holding `state_dict`, loaded strictly) and the Flax model
    (holding `variables`) on the same seeded random images; returns one Comparison per output
    (the logits, or the four backbone maps compared in NCHW; for segmentation models the logits
    at the input size and, with an auxiliary head, its logits too)."""
    import jax
    import torch

    if is_segmentation_name(name):
        return _compare_segmentation_with_torch(
            state_dict, variables, name, num_classes, image_size, batch_size, seed, overrides
        )

    from crossformer_jax.crossformer import create_model
    from crossformer_jax.torch_reference import create_torch_model

    kwargs = dict(features_only=features_only, **overrides)
    if not features_only:
        kwargs['num_classes'] = num_classes
    torch_model = create_torch_model(name, **kwargs)
    torch_model.eval()
    # The derived buffers are the reference's own (they depend on the group size only); everything
    # else must come from the checkpoint, strictly.
    _load_torch_reference(torch_model, state_dict)

    height, width = image_size
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch_size, 3, height, width)).astype(np.float32)
    with torch.no_grad():
        reference = torch_model(torch.from_numpy(images))
    flax_model = create_model(name, **kwargs)
    outputs = jax.jit(lambda v, x: flax_model.apply(v, x))(variables, images.transpose(0, 2, 3, 1))

    if features_only:
        pairs = [
            (f'stage {s} map', r.numpy(), np.asarray(o).transpose(0, 3, 1, 2))
            for s, (r, o) in enumerate(zip(reference, outputs))
        ]
        if len(reference) != len(outputs):
            raise RuntimeError(f'reference gave {len(reference)} maps, Flax {len(outputs)}')
    else:
        pairs = [('logits', reference.numpy(), np.asarray(outputs))]
    return [Comparison.of(label, ref, out) for label, ref, out in pairs]


def _load_torch_reference(torch_model, state_dict: Mapping[str, Any]) -> None:
    """Loads `state_dict` strictly, the derived buffers (and BatchNorm step counters) excepted:
    those are the reference's own."""
    import torch

    own = torch_model.state_dict()
    loaded = {}
    for k, v in state_dict.items():
        k = _strip_module_prefix(k)
        if not is_derived_buffer(k):
            loaded[k] = v if isinstance(v, torch.Tensor) else torch.from_numpy(_to_numpy(v))
    loaded.update({k: v for k, v in own.items() if is_derived_buffer(k)})
    torch_model.load_state_dict(loaded, strict=True)


def _compare_segmentation_with_torch(
    state_dict, variables, name, num_classes, image_size, batch_size, seed, overrides
) -> list[Comparison]:
    import jax
    import torch

    from crossformer_jax.crossformer import create_model
    from crossformer_jax.segmentation import FCNHead, resize_bilinear, segmentation_backbone
    from crossformer_jax.torch_segmentation import create_torch_segmentation_model

    torch_model = create_torch_segmentation_model(name, num_classes, **overrides)
    _load_torch_reference(torch_model, state_dict)
    height, width = image_size
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch_size, 3, height, width)).astype(np.float32)
    with torch.no_grad():
        reference = {'logits': torch_model(torch.from_numpy(images)).numpy()}
        if hasattr(torch_model, 'auxiliary_head'):
            reference['auxiliary logits'] = torch_model.auxiliary(torch.from_numpy(images)).numpy()

    model = create_model(name, num_classes, **overrides)
    images_nhwc = images.transpose(0, 2, 3, 1)
    outputs = {'logits': jax.jit(model.apply)(variables, images_nhwc)}
    if 'auxiliary logits' in reference:
        backbone = segmentation_backbone(model)

        @jax.jit
        def auxiliary(variables, images):
            features = backbone.apply({'params': variables['params']['backbone']}, images)
            head = FCNHead(num_classes, model.aux_channels, model.dropout_rate)
            head_variables = {k: v['auxiliary_head'] for k, v in variables.items()}
            logits = head.apply(head_variables, features[2], False)
            return resize_bilinear(logits, images.shape[1:3])

        outputs['auxiliary logits'] = auxiliary(variables, images_nhwc)
    return [
        Comparison.of(label, ref, np.asarray(outputs[label]).transpose(0, 3, 1, 2))
        for label, ref in reference.items()
    ]


# -------------------------------------------------------------------------------------------------
# Command line (convert_torch_weights.py).


def _parse_image_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r'\s*(\d+)\s*(?:[x,]\s*(\d+)\s*)?', text)
    if not match:
        raise argparse.ArgumentTypeError(f'expected SIZE or HEIGHTxWIDTH, got {text!r}')
    h = int(match.group(1))
    w = int(match.group(2)) if match.group(2) else h
    if h <= 0 or w <= 0 or h % 32 or w % 32:
        raise argparse.ArgumentTypeError(
            f'image size must be positive multiples of 32, got {h}x{w}'
        )
    return h, w


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a number, got {text!r}') from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f'expected a positive number, got {text!r}')
    return value


def positive_int(text: str) -> int:
    """argparse type: a positive integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected an integer, got {text!r}') from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {text!r}')
    return value


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='convert_torch_weights.py',
        description='Convert a PyTorch CrossFormer / CrossFormer++ checkpoint (.pth) into a '
        'crossformer_jax pretrained directory (orbax checkpoint + metadata).',
    )
    parser.add_argument(
        '--checkpoint',
        required=True,
        help="PyTorch checkpoint: {'model': sd}, {'state_dict': sd with backbone.*} "
        'or a bare state dict; read with weights-only unpickling',
    )
    parser.add_argument(
        '--model',
        default=None,
        help='variant name (e.g. crossformer_small); inferred from the weights when omitted',
    )
    parser.add_argument('--output', required=True, help='directory to write')
    parser.add_argument(
        '--overwrite',
        action='store_true',
        help='replace an existing output directory (only after the new one is complete)',
    )
    parser.add_argument(
        '--num-classes',
        type=positive_int,
        default=None,
        help='classes of the head (default: read from head.weight); an explicit '
        'value must match the checkpoint',
    )
    parser.add_argument(
        '--verify',
        action='store_true',
        help='compare against the PyTorch reference on a random input before '
        'writing; exit 1 if they differ by more than the tolerance',
    )
    parser.add_argument(
        '--tolerance',
        type=_positive_float,
        default=1e-4,
        help='--verify fails when max|diff| > tolerance * max|reference| (default 1e-4)',
    )
    parser.add_argument(
        '--image-size',
        type=_parse_image_size,
        default=(224, 224),
        help='input size for --verify: SIZE or HEIGHTxWIDTH, multiples of 32 (default 224)',
    )
    parser.add_argument(
        '--seed', type=int, default=0, help='seed of the --verify input (default 0)'
    )
    return parser


def _check_output_path(output: str, overwrite: bool) -> None:
    from crossformer_jax.pretrained import PretrainedError, check_replaceable

    if os.path.lexists(output):
        if not overwrite:
            raise PretrainedError(f'output {output} already exists; pass --overwrite to replace it')
        check_replaceable(output)
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise PretrainedError(f'cannot write {output}: parent directory {parent} does not exist')


def run_cli(args: argparse.Namespace, out=None) -> int:
    """The conversion steps of the command line; raises ValueError/OSError on user errors."""
    from crossformer_jax.pretrained import save_pretrained

    def say(text: str = '') -> None:
        print(text, file=out or sys.stdout, flush=True)

    _check_output_path(args.output, args.overwrite)  # fail early, before the slow steps
    checkpoint = read_torch_checkpoint(args.checkpoint)
    # A segmentation checkpoint converts whole unless --model names a backbone variant.
    keep_heads = args.model is None or is_segmentation_name(args.model)
    state_dict, skipped_outer = extract_state_dict(checkpoint, keep_heads=keep_heads)
    del checkpoint
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

    say(f'checkpoint: {args.checkpoint}')
    if is_segmentation_name(name):
        kind = f'segmentation, {report.num_classes} classes'
        if report.overrides:
            kind += f', head widths {report.overrides}'
    elif report.features_only:
        kind = 'backbone, 4 feature maps'
    else:
        kind = f'classifier, {report.num_classes} classes'

    say(f'model: {name} ({kind})')
    say(f'parameters: {report.num_params:,} in {len(_leaves(variables))} arrays')
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

    status = 0
    if args.verify:
        h, w = args.image_size
        say(f'verifying against the PyTorch reference at {h}x{w} (seed {args.seed}) ...')
        comparisons = compare_with_torch(
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
            ok = c.max_abs_diff <= args.tolerance * c.max_abs_reference
            say(
                f'  {c.label} {c.shape}: max|diff| {c.max_abs_diff:.3e}, max|reference| '
                f'{c.max_abs_reference:.3e}, relative {c.relative:.3e} '
                f'{"ok" if ok else "FAILED"} (tolerance {args.tolerance:g})'
            )
            if not ok:
                status = 1
        if status:
            print(
                f'error: verification failed (relative difference above {args.tolerance:g}); '
                f'nothing written to {args.output}',
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
        extra_metadata={
            'source_file': os.path.abspath(args.checkpoint),
            'skipped_keys': len(skipped),
        },
    )
    say(f'wrote {args.output}')
    return status


def _leaves(tree) -> list:
    if isinstance(tree, Mapping):
        return [leaf for v in tree.values() for leaf in _leaves(v)]
    return [tree]


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
