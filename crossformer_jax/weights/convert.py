"""Conversion of PyTorch CrossFormer / CrossFormer++ checkpoints to Flax parameters.

The mapping between PyTorch state-dict keys and the Flax parameter tree is the one fixed in
docs/parameter_names.md. Rather than hard-coding every key, the converter derives the expected
PyTorch keys and shapes from the Flax model itself (`jax.eval_shape` of `create_model(...).init`,
so no memory is allocated) and then checks the given state dict against them: every missing key,
every unused key and every shape mismatch is reported together in one `StateDictMismatchError`.

Library entry points:

    infer_model_name(state_dict)           -> registered variant name
    convert_torch_state_dict(sd, name)     -> {'params': nested dict of float32 numpy arrays}
    flax_to_torch_state_dict(variables)    -> the inverse mapping (crossformer_jax.weights.export)

Reading .pth files is crossformer_jax.weights.torch_io, the check against the PyTorch reference
crossformer_jax.weights.verify, the command line crossformer_jax.cli.convert. State dicts of numpy
arrays convert without PyTorch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from crossformer_jax.models import create_model, list_models
from crossformer_jax.models.crossformer import VARIANTS
from crossformer_jax.models.detection import DETECTION_VARIANTS, detection_config
from crossformer_jax.models.mask_rcnn import MASK_RCNN_VARIANTS, mask_rcnn_config
from crossformer_jax.models.segmentation import SEGMENTATION_VARIANTS, segmentation_config
from crossformer_jax.weights.torch_io import (
    CheckpointError,
    is_array,
    is_detection_state_dict,
    is_segmentation_state_dict,
    natural_key,
    strip_module_prefix,
)

CONVERTER_VERSION = '1'

# Non-learned buffers of the v1 classification checkpoints (derived from the group size) and
# BatchNorm's step counter (unused with a fixed momentum); the converter skips them.
DERIVED_BUFFER_SUFFIXES = ('.attn.biases', '.attn.relative_position_index', '.num_batches_tracked')

# The input used to trace the model for its parameter shapes (which do not depend on it).
TRACE_IMAGE_SIZE = 64


# -------------------------------------------------------------------------------------------------
# Errors.


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
        self.missing = sorted(missing, key=natural_key)
        self.unexpected = sorted(unexpected, key=natural_key)
        self.mismatched = dict(
            sorted((mismatched or {}).items(), key=lambda kv: natural_key(kv[0]))
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
    num_classes, features_only = key[0], key[1]
    model = create_model(name, num_classes=num_classes, features_only=features_only, **overrides)
    images = jax.ShapeDtypeStruct((1, TRACE_IMAGE_SIZE, TRACE_IMAGE_SIZE, 3), jnp.float32)
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


def to_numpy(value: Any) -> np.ndarray:
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
    return name in SEGMENTATION_VARIANTS


def is_detection_name(name: str) -> bool:
    """RetinaNet or (Cascade) Mask R-CNN: an MMDetection model."""
    return name in DETECTION_VARIANTS or name in MASK_RCNN_VARIANTS


def is_mask_rcnn_name(name: str) -> bool:
    return name in MASK_RCNN_VARIANTS


def convert_torch_state_dict(
    state_dict: Mapping[str, Any],
    name: str,
    *,
    num_classes: int | None = None,
    features_only: bool | None = None,
    **overrides,
) -> dict[str, Any]:
    """PyTorch state dict -> Flax variables {'params': nested dict of float32 numpy arrays}, plus
    'batch_stats' (BatchNorm running statistics) for segmentation models and Cascade Mask R-CNN.

    Values may be torch tensors or numpy arrays; `module.` prefixes are removed. Unless given,
    `features_only` is True when the state dict has no `head.*` keys and `num_classes` is read from
    `head.weight` (`decode_head.conv_seg.weight` for segmentation models, whose head widths come
    from `segmentation_overrides` unless given; `bbox_head.retina_cls.weight` for RetinaNet,
    `roi_head.bbox_head(.0).fc_cls.weight` for (Cascade) Mask R-CNN: detection models, whose
    neck and head widths come from `detection_overrides`). `overrides` go to
    `create_model` (e.g. reduced depths in tests). The derived buffers `attn.biases` /
    `attn.relative_position_index` and BatchNorm's `num_batches_tracked` are ignored; any other
    unused key, any missing key and any shape mismatch raise one `StateDictMismatchError` that
    lists them all.
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
    elif is_detection_name(name):
        what = f'detection model with {num_classes} classes'
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
    state_dict = {strip_module_prefix(k): v for k, v in state_dict.items()}
    if is_segmentation_name(name):
        if features_only:
            raise ValueError(f'{name} is a segmentation model; features_only does not apply')
        features_only = False
        overrides = {**segmentation_overrides(state_dict, name), **overrides}
        if num_classes is None:
            conv_seg = _shape_of(state_dict, 'decode_head.conv_seg.weight')
            num_classes = conv_seg[0] if conv_seg else 150
    elif is_detection_name(name):
        if features_only:
            raise ValueError(f'{name} is a detection model; features_only does not apply')
        features_only = False
        overrides = {**detection_overrides(state_dict, name), **overrides}
        if num_classes is None:
            num_classes = detection_num_classes(state_dict, name, overrides)
    if features_only is None:
        features_only = not any(k.startswith('head.') for k in state_dict)
    if num_classes is None:
        head = state_dict.get('head.weight')
        num_classes = (
            int(head.shape[0])
            if (not features_only and is_array(head) and len(head.shape) == 2)
            else 1000
        )
    expected = expected_torch_shapes(
        name, num_classes=num_classes, features_only=features_only, **overrides
    )

    skipped = sorted(
        (k for k in state_dict if is_derived_buffer(k) and k not in expected), key=natural_key
    )
    found_shapes, invalid = {}, {}
    for k, v in state_dict.items():
        if is_array(v):
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
    state_dict, expected, report = _prepare(state_dict, name, num_classes, features_only, overrides)
    flat: dict[str, dict] = {}
    for k, e in expected.items():
        value = to_numpy(state_dict[k])
        if e.kind == 'linear':
            value = value.T
        elif e.kind == 'conv':
            value = value.transpose(2, 3, 1, 0)
        flat.setdefault(e.collection, {})[e.path] = np.ascontiguousarray(value)
    return {collection: unflatten_dict(tree) for collection, tree in flat.items()}, report


def flax_to_torch_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inverse mapping: Flax variables -> PyTorch-named numpy arrays (without derived buffers).

    With 'batch_stats' (segmentation models, Cascade Mask R-CNN) the result is an MMSegmentation /
    MMDetection state dict: every
    BatchNorm also gets running_mean / running_var and a num_batches_tracked of 0 (int64), which
    PyTorch's BatchNorm2d keeps in its state dict but does not use with a fixed momentum.
    """
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
    return tuple(int(d) for d in value.shape) if is_array(value) else None


def describe_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture facts visible in a state dict: embed_dim, depths, heads, ACL, classes."""
    state_dict = {strip_module_prefix(k): v for k, v in state_dict.items()}
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
    decode head) or 'fpn_<backbone>' (neck.* keys) for the backbone under backbone.*; a detection
    state dict gives 'retinanet_<backbone>' (bbox_head.retina_cls.weight),
    'cascade_mask_rcnn_<backbone>' (rpn_head.* and roi_head.bbox_head.0.* keys) or
    'mask_rcnn_<backbone>' (rpn_head.* and roi_head.* keys otherwise). Uses
    embed_dim (patch_embed.norm.weight), the number of blocks per stage, the heads of each
    stage (the DPB's last Linear) and the presence of ACL keys (ex_conv: CrossFormer++ only, which
    tells crossformer_base from crossformer_pp_base, crossformer_large from crossformer_pp_large).
    Raises `ModelNameError` listing what was found when no variant or several match.
    """
    if is_detection_state_dict(state_dict):
        return _infer_detection_name(state_dict)
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
    keys = [strip_module_prefix(k) for k in state_dict]
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
    name = f'{head}_{infer_model_name(_backbone_part(state_dict, "segmentation"))}'
    if name not in SEGMENTATION_VARIANTS:
        raise ModelNameError(
            f'the state dict looks like {name}, which is not a registered segmentation model '
            f'({", ".join(sorted(SEGMENTATION_VARIANTS))}); pass --model explicitly'
        )
    return name


def _backbone_part(state_dict: Mapping[str, Any], family: str) -> dict[str, Any]:
    """The backbone.* entries of a whole model's state dict, prefix removed; ModelNameError when
    there are none."""
    backbone = {
        k[len('backbone.') :]: v
        for k, v in ((strip_module_prefix(k), v) for k, v in state_dict.items())
        if k.startswith('backbone.')
    }
    if not backbone:
        raise ModelNameError(f'the {family} state dict has no backbone.* keys')
    return backbone


def _infer_detection_name(state_dict: Mapping[str, Any]) -> str:
    keys = {strip_module_prefix(k) for k in state_dict}
    has_rpn = any(k.startswith('rpn_head.') for k in keys)
    has_roi = any(k.startswith('roi_head.') for k in keys)
    if 'bbox_head.retina_cls.weight' in keys:
        family = 'retinanet'
    elif has_rpn and any(k.startswith('roi_head.bbox_head.0.') for k in keys):
        family = 'cascade_mask_rcnn'
    elif has_rpn and has_roi:
        family = 'mask_rcnn'
    else:
        head_keys = sorted(
            (k for k in keys if k.startswith(('bbox_head.', 'rpn_head.', 'roi_head.'))),
            key=natural_key,
        )
        raise ModelNameError(
            'cannot tell the detection head from the state dict: expected '
            "'bbox_head.retina_cls.weight' (RetinaNet) or 'rpn_head.*' with 'roi_head.*' keys "
            f'((Cascade) Mask R-CNN); found {", ".join(head_keys[:6])}'
            + (' ...' if len(head_keys) > 6 else '')
        )
    name = f'{family}_{infer_model_name(_backbone_part(state_dict, "detection"))}'
    registered = sorted(DETECTION_VARIANTS) + sorted(MASK_RCNN_VARIANTS)
    if name not in registered:
        raise ModelNameError(
            f'the state dict looks like {name}, which is not a registered detection model '
            f'({", ".join(registered)}); pass --model explicitly'
        )
    return name


def _count_layers(state_dict: Mapping[str, Any], prefix: str) -> int:
    """1 + the largest index i of the keys '{prefix}.{i}.*' (0 when there are none)."""
    pattern = re.compile(re.escape(prefix) + r'\.(\d+)\.')
    indices = {int(m.group(1)) for m in map(pattern.match, state_dict) if m}
    return max(indices) + 1 if indices else 0


def _mask_rcnn_head_prefixes(name: str) -> tuple[str, str]:
    """The state dict prefixes of the (first stage's) box and mask heads."""
    stage = '.0' if mask_rcnn_config(name)['cascade'] else ''
    return f'roi_head.bbox_head{stage}', f'roi_head.mask_head{stage}'


def _mask_rcnn_overrides(state_dict: Mapping[str, Any], name: str) -> dict[str, Any]:
    default = mask_rcnn_config(name)
    box, mask = _mask_rcnn_head_prefixes(name)
    # Each width with the (key, axis) pairs that show it, the first present one is used.
    sources = {
        'fpn_channels': [
            ('neck.lateral_convs.0.conv.weight', 0),
            ('neck.lateral_convs.0.conv.bias', 0),
            ('neck.fpn_convs.0.conv.weight', 0),
        ],
        'rpn_channels': [('rpn_head.rpn_conv.weight', 0), ('rpn_head.rpn_cls.weight', 1)],
        'box_conv_channels': [(f'{box}.shared_convs.0.conv.weight', 0)],
        'box_fc_channels': [(f'{box}.shared_fcs.0.weight', 0)],
        'mask_channels': [
            (f'{mask}.convs.0.conv.weight', 0),
            (f'{mask}.upsample.weight', 1),
            (f'{mask}.conv_logits.weight', 1),
        ],
    }
    overrides = {}
    for field, candidates in sources.items():
        shapes = [_shape_of(state_dict, key) for key, _ in candidates]
        widths = [shape[axis] for shape, (_, axis) in zip(shapes, candidates) if shape]
        if widths and widths[0] != default[field]:
            overrides[field] = widths[0]
    layers = {
        'num_box_convs': f'{box}.shared_convs',
        'num_box_fcs': f'{box}.shared_fcs',
        'num_mask_convs': f'{mask}.convs',
    }
    for field, prefix in layers.items():
        count = _count_layers(state_dict, prefix)
        if count != default[field]:
            overrides[field] = count
    return overrides


def detection_overrides(state_dict: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Neck and head widths of a detection state dict that differ from the registered model's,
    read from the layer shapes and the number of indexed layers: for RetinaNet fpn_channels,
    head_channels, num_head_convs (bbox_head.cls_convs.* / reg_convs.*); for (Cascade) Mask
    R-CNN fpn_channels, rpn_channels, box_conv_channels, box_fc_channels, mask_channels,
    num_box_convs, num_box_fcs, num_mask_convs (shared_convs.*, shared_fcs.* and convs.* of the
    (first stage's) box and mask heads)."""
    state_dict = {strip_module_prefix(k): v for k, v in state_dict.items()}
    if is_mask_rcnn_name(name):
        return _mask_rcnn_overrides(state_dict, name)
    default = detection_config(name)
    overrides = {}
    # Each width with the (key, axis) pairs that show it, the first present one is used.
    sources = {
        'fpn_channels': [
            ('neck.lateral_convs.0.conv.weight', 0),
            ('neck.lateral_convs.0.conv.bias', 0),
            ('neck.fpn_convs.0.conv.weight', 0),
        ],
        'head_channels': [
            ('bbox_head.cls_convs.0.conv.weight', 0),
            ('bbox_head.reg_convs.0.conv.weight', 0),
        ],
    }
    for field, candidates in sources.items():
        shapes = [_shape_of(state_dict, key) for key, _ in candidates]
        widths = [shape[axis] for shape, (_, axis) in zip(shapes, candidates) if shape]
        if widths and widths[0] != default[field]:
            overrides[field] = widths[0]
    tower = re.compile(r'^bbox_head\.(?:cls|reg)_convs\.(\d+)\.')
    layers = {int(m.group(1)) for m in map(tower.match, state_dict) if m}
    num_convs = max(layers) + 1 if layers else 0
    if num_convs != default['num_head_convs']:
        overrides['num_head_convs'] = num_convs
    return overrides


def detection_num_classes(
    state_dict: Mapping[str, Any], name: str, overrides: Mapping[str, Any]
) -> int:
    """Classes of a detection state dict: retina_cls's output channels / anchors per position
    (RetinaNet), fc_cls's outputs - 1 (the background; (Cascade) Mask R-CNN); 80 when the key is
    missing, which the conversion then reports. ValueError when they do not divide."""
    state_dict = {strip_module_prefix(k): v for k, v in state_dict.items()}
    if is_mask_rcnn_name(name):
        key = f'{_mask_rcnn_head_prefixes(name)[0]}.fc_cls.weight'
        shape = _shape_of(state_dict, key)
        if shape and shape[0] < 2:
            raise ValueError(
                f'{key} has {shape[0]} outputs; expected classes + 1 (the background), at least 2'
            )
        return shape[0] - 1 if shape else 80
    shape = _shape_of(state_dict, 'bbox_head.retina_cls.weight')
    if not shape:
        return 80
    anchors = detection_config(name, **overrides)['anchor_generator'].num_anchors
    if shape[0] % anchors:
        raise ValueError(
            f'bbox_head.retina_cls.weight has {shape[0]} output channels, not a multiple of the '
            f'{anchors} anchors per position of {name} (expected anchors * classes)'
        )
    return shape[0] // anchors


def segmentation_overrides(state_dict: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Head widths of a segmentation state dict that differ from the registered model's
    (head_channels, aux_channels, neck_channels), read from the conv shapes; aux_channels None
    when a UPerNet state dict has no auxiliary_head.* keys."""
    state_dict = {strip_module_prefix(k): v for k, v in state_dict.items()}
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
    if name not in list_models():
        raise ModelNameError(f'unknown model {name!r}; available: {", ".join(list_models())}')
    return name
