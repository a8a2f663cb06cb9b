"""Saving and loading converted (or trained) CrossFormer weights as a self-describing directory.

Layout of a pretrained directory:

    DIR/metadata.json   model name, num_classes, features_only, create_model overrides,
                        converter version, the preprocessing the weights expect (timm's
                        pretrained-config fields input_size, crop_pct, interpolation, mean,
                        std), label_names, and whatever extra metadata the writer added
    DIR/variables/      orbax checkpoint of the Flax variables {'params': ...}

`save_pretrained` is atomic: everything is written into a hidden temporary sibling directory
(`.DIR.tmp-XXXX`) which is renamed to DIR only once complete, so an interrupted run never leaves a
half-written DIR (at most a stale hidden temporary directory, safe to delete). An existing DIR is
refused unless overwrite=True, and then only replaced after the new one is complete; to avoid
deleting unrelated data by accident, overwrite only replaces an empty directory or an earlier
pretrained directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from crossformer_jax.data.config import DATA_DEFAULTS, IMAGENET_MEAN, IMAGENET_STD
from crossformer_jax.models import create_model
from crossformer_jax.models.crossformer import ARCHITECTURE_FIELDS
from crossformer_jax.models.detection import DETECTION_VARIANTS
from crossformer_jax.models.mask_rcnn import MASK_RCNN_VARIANTS
from crossformer_jax.models.segmentation import SEGMENTATION_VARIANTS
from crossformer_jax.training import checkpointing
from crossformer_jax.weights.convert import CONVERTER_VERSION

METADATA_FILE = 'metadata.json'
VARIABLES_DIR = 'variables'
FORMAT_NAME = 'crossformer_jax.weights.pretrained'
FORMAT_VERSION = 1

# JSON-friendly create_model overrides that describe the architecture (dtype / remat are runtime
# choices and are not stored).
_STORABLE_OVERRIDES = (
    *ARCHITECTURE_FIELDS,
    # Segmentation heads (crossformer_jax.models.segmentation); head_channels also detection.
    'head_channels',
    'aux_channels',
    'neck_channels',
    # Detection neck and heads (crossformer_jax.models.detection, crossformer_jax.models.mask_rcnn).
    'fpn_channels',
    'num_head_convs',
    'rpn_channels',
    'box_conv_channels',
    'box_fc_channels',
    'mask_channels',
    'num_box_convs',
    'num_box_fcs',
    'num_mask_convs',
    'roi_exact_extent',
)


class PretrainedError(ValueError):
    """A pretrained directory that cannot be written or read."""


# -------------------------------------------------------------------------------------------------
# Preprocessing and class names stored with the weights.

INTERPOLATIONS = ('bicubic', 'bilinear', 'nearest')


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How images are prepared for the weights (evaluation transform).

    Resize the short side to floor(size / crop_pct) with `interpolation`, centre-crop
    input_size = (H, W), scale to [0, 1], subtract mean and divide by std (per RGB channel).
    """

    input_size: tuple[int, int] = (DATA_DEFAULTS['image_size'],) * 2
    crop_pct: float = DATA_DEFAULTS['eval_crop_fraction']
    interpolation: str = 'bicubic'
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_metadata(self) -> dict[str, Any]:
        """The timm pretrained-config fields: input_size is (3, H, W)."""
        return {
            'input_size': [3, *self.input_size],
            'crop_pct': self.crop_pct,
            'interpolation': self.interpolation,
            'mean': list(self.mean),
            'std': list(self.std),
        }


# COCO detectors (MMDetection's test pipeline): the whole image resized, keeping its aspect ratio,
# to fit 800 x 1333 (short side 800 unless the long side would pass 1333), bilinear.
DETECTION_INPUT_SIZE = (800, 1333)


def default_preprocessing(model_name: str) -> Preprocessing:
    """What the published weights of `model_name` expect: ImageNet's evaluation transform for
    classifiers and backbones; for segmentation models (ADE20K) the whole image at 512, bilinear;
    for detection models (COCO) the whole image fit to DETECTION_INPUT_SIZE, bilinear (the
    normalisation is ImageNet's mean and std in every case)."""
    if model_name in SEGMENTATION_VARIANTS:
        return Preprocessing(input_size=(512, 512), crop_pct=1.0, interpolation='bilinear')
    if model_name in DETECTION_VARIANTS or model_name in MASK_RCNN_VARIANTS:
        return Preprocessing(
            input_size=DETECTION_INPUT_SIZE, crop_pct=1.0, interpolation='bilinear'
        )
    return Preprocessing()


def preprocessing_from_metadata(metadata: Mapping[str, Any], source: str = 'metadata'):
    """The Preprocessing recorded in `metadata`; fields it lacks (older directories) take the
    model's defaults (`default_preprocessing`: ImageNet's for classifiers). PretrainedError
    names the field when a recorded value is unusable."""
    default = default_preprocessing(metadata.get('model_name', ''))
    try:
        size = metadata.get('input_size')
        if size is None:
            input_size = default.input_size
        else:
            if len(size) != 3 or int(size[0]) != 3 or min(int(size[1]), int(size[2])) <= 0:
                raise ValueError(f'expected [3, H, W], got {size}')
            input_size = (int(size[1]), int(size[2]))
        crop_pct = float(metadata.get('crop_pct', default.crop_pct))
        if not 0 < crop_pct <= 1:
            raise ValueError(f'crop_pct must be in (0, 1], got {crop_pct}')
        interpolation = metadata.get('interpolation', default.interpolation)
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f'interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}'
            )
        mean = tuple(float(v) for v in metadata.get('mean', default.mean))
        std = tuple(float(v) for v in metadata.get('std', default.std))
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f'mean and std need 3 entries (std > 0), got {mean} and {std}')
    except (TypeError, ValueError) as e:
        raise PretrainedError(f'{source}: unusable preprocessing fields: {e}') from e
    return Preprocessing(input_size, crop_pct, interpolation, mean, std)


def imagenet_label_names() -> list[str]:
    """The 1000 ImageNet-1K class names in class-index order ('tench, Tinca tinca', ...).

    tensorflow-datasets ships them (in the same order as its imagenet2012 label ids, the
    WordNet ids n01440764, ...) with its SI-Score dataset.
    """
    from tensorflow_datasets.datasets.siscore.labels import IMAGENET_LABELS_LIST

    names = [str(name) for name in IMAGENET_LABELS_LIST]
    if len(names) != 1000:
        raise PretrainedError(f'tensorflow-datasets lists {len(names)} ImageNet classes, not 1000')
    return names


def label_names_from_metadata(metadata: Mapping[str, Any]) -> list[str] | None:
    """The class names recorded in `metadata`; for an older 1000-class directory without them,
    the ImageNet-1K names; None when there are none (use class indices)."""
    names = metadata.get('label_names')
    num_classes = metadata.get('num_classes')
    if names is not None:
        if num_classes is not None and len(names) != num_classes:
            raise PretrainedError(
                f'metadata lists {len(names)} label_names for a {num_classes}-class head'
            )
        return [str(n) for n in names]
    if num_classes == 1000:
        return imagenet_label_names()
    return None


def _read_metadata(directory: str) -> dict[str, Any] | None:
    path = os.path.join(directory, METADATA_FILE)
    try:
        with open(path, encoding='utf-8') as f:
            metadata = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(metadata, dict) or metadata.get('format') != FORMAT_NAME:
        return None
    return metadata


def check_replaceable(directory: str | os.PathLike) -> None:
    """Raises PretrainedError unless `directory` is an empty directory or a pretrained directory."""
    directory = os.fspath(directory)
    if os.path.islink(directory) or not os.path.isdir(directory):
        raise PretrainedError(f'refusing to overwrite {directory}: it is not a directory')
    if os.listdir(directory) and _read_metadata(directory) is None:
        raise PretrainedError(
            f'refusing to overwrite {directory}: it is not empty and not a '
            f'crossformer_jax pretrained directory (no valid {METADATA_FILE})'
        )


WORKDIR_FORMAT_NAME = 'crossformer_jax.workdir'


def workdir_metadata(
    *,
    model_name: str,
    model_overrides: Mapping[str, Any],
    num_classes: int,
    preprocessing: Preprocessing,
    label_names: Sequence[str] | None,
) -> dict[str, Any]:
    """The metadata.json a training run writes into its workdir: the same fields as a
    pretrained directory's (architecture overrides only: dtype, remat and regularisation rates
    are training choices)."""
    if label_names is not None and len(label_names) != num_classes:
        raise PretrainedError(f'{len(label_names)} label_names for {num_classes} classes')
    metadata = {
        'format': WORKDIR_FORMAT_NAME,
        'format_version': FORMAT_VERSION,
        'model_name': model_name,
        'num_classes': int(num_classes),
        'features_only': False,
        'model_overrides': {
            k: _json_value(v) for k, v in model_overrides.items() if k in _STORABLE_OVERRIDES
        },
        **preprocessing.to_metadata(),
    }
    if label_names is not None:
        metadata['label_names'] = [str(n) for n in label_names]
    return metadata


def _json_value(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_json_value(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def save_pretrained(
    directory: str | os.PathLike,
    variables: Mapping[str, Any],
    *,
    model_name: str,
    num_classes: int | None,
    features_only: bool,
    overwrite: bool = False,
    extra_metadata: Mapping[str, Any] | None = None,
    model_overrides: Mapping[str, Any] | None = None,
    preprocessing: Preprocessing | None = None,
    label_names: Sequence[str] | None = None,
) -> str:
    """Writes `variables` ({'params': ...}) and metadata to `directory`, atomically.

    model_overrides: architecture overrides of `create_model` (e.g. depths for a reduced model),
    stored so that `load_pretrained` rebuilds the same module. preprocessing: the evaluation
    transform the weights expect (default: ImageNet's, 224 px, crop 0.875, bicubic). label_names:
    one name per class (default for a 1000-class head: the ImageNet-1K classes). Returns the
    absolute directory.
    """
    directory = os.path.abspath(os.fspath(directory))
    if not isinstance(variables, Mapping) or 'params' not in variables:
        raise PretrainedError("variables must be a dict with a 'params' entry")
    overrides = dict(model_overrides or {})
    bad = sorted(set(overrides) - set(_STORABLE_OVERRIDES))
    if bad:
        raise PretrainedError(
            f'cannot store the overrides {bad} (storable: {list(_STORABLE_OVERRIDES)})'
        )
    if os.path.lexists(directory):
        if not overwrite:
            raise PretrainedError(f'{directory} already exists; pass overwrite=True to replace it')
        check_replaceable(directory)
    parent, base = os.path.split(directory)
    if not os.path.isdir(parent):
        raise PretrainedError(f'cannot write {directory}: parent directory {parent} does not exist')

    num_classes = None if features_only else int(num_classes if num_classes is not None else 1000)
    if label_names is None and num_classes == 1000:
        label_names = imagenet_label_names()
    if label_names is not None and len(label_names) != num_classes:
        raise PretrainedError(
            f'{len(label_names)} label_names given for a head of {num_classes} classes'
        )
    metadata = {
        'format': FORMAT_NAME,
        'format_version': FORMAT_VERSION,
        'model_name': model_name,
        'num_classes': num_classes,
        'features_only': bool(features_only),
        'model_overrides': {k: _json_value(v) for k, v in overrides.items()},
        'converter_version': CONVERTER_VERSION,
        'num_params': int(sum(np.size(x) for x in jax.tree_util.tree_leaves(variables['params']))),
        **(preprocessing or default_preprocessing(model_name)).to_metadata(),
    }
    if label_names is not None:
        metadata['label_names'] = [str(n) for n in label_names]
    for key, value in (extra_metadata or {}).items():
        if key in metadata:
            raise PretrainedError(f'extra metadata may not replace {key!r}')
        metadata[key] = _json_value(value)
    try:
        metadata_text = json.dumps(metadata, indent=2, sort_keys=True)
    except TypeError as e:
        raise PretrainedError(f'metadata is not JSON-serialisable: {e}') from e

    tree = jax.tree_util.tree_map(lambda x: np.asarray(x, dtype=np.float32), dict(variables))
    tmp = tempfile.mkdtemp(prefix=f'.{base}.tmp-', dir=parent)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(os.path.join(tmp, VARIABLES_DIR), tree)
            checkpointer.wait_until_finished()
        with open(os.path.join(tmp, METADATA_FILE), 'w', encoding='utf-8') as f:
            f.write(metadata_text + '\n')
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if os.path.lexists(directory):
            old = tempfile.mkdtemp(prefix=f'.{base}.old-', dir=parent)
            os.rmdir(old)
            os.rename(directory, old)
            try:
                os.rename(tmp, directory)
            except BaseException:
                os.rename(old, directory)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a pretrained directory; PretrainedError when missing or incomplete."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise PretrainedError(f'no pretrained directory at {directory}')
    path = os.path.join(directory, METADATA_FILE)
    if not os.path.isfile(path):
        raise PretrainedError(
            f'{directory} is not a complete pretrained directory: {METADATA_FILE} is missing'
        )
    try:
        with open(path, encoding='utf-8') as f:
            metadata = json.load(f)
    except (OSError, ValueError) as e:
        raise PretrainedError(f'cannot read {path}: {e}') from e
    if not isinstance(metadata, dict) or metadata.get('format') != FORMAT_NAME:
        raise PretrainedError(f'{path} is not crossformer_jax pretrained metadata')
    if metadata.get('format_version') != FORMAT_VERSION:
        raise PretrainedError(
            f'{path} has format version {metadata.get("format_version")}; this '
            f'version of crossformer_jax reads {FORMAT_VERSION}'
        )
    for key in ('model_name', 'features_only'):
        if key not in metadata:
            raise PretrainedError(f'{path} lacks {key!r}')
    if not os.path.isdir(os.path.join(directory, VARIABLES_DIR)):
        raise PretrainedError(
            f'{directory} is not a complete pretrained directory: {VARIABLES_DIR}/ is missing'
        )
    return metadata


def load_pretrained(directory: str | os.PathLike, *, dtype: Any = None):
    """Rebuilds the Flax module from the metadata and restores its variables.

    dtype: compute dtype of the module (e.g. jnp.bfloat16); parameters are always float32.
    Returns (model, variables) with variables {'params': ...} of float32 jax arrays (segmentation
    models also 'batch_stats', the BatchNorm running statistics).
    """
    directory = os.path.abspath(os.fspath(directory))
    metadata = read_metadata(directory)
    overrides = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in (metadata.get('model_overrides') or {}).items()
    }
    if dtype is not None:
        overrides['dtype'] = dtype
    features_only = bool(metadata['features_only'])
    num_classes = 1000 if metadata.get('num_classes') is None else metadata['num_classes']
    try:
        model = create_model(
            metadata['model_name'],
            num_classes=num_classes,
            features_only=features_only,
            **overrides,
        )
    except ValueError as e:
        raise PretrainedError(f'{directory}: cannot build the model: {e}') from e
    try:
        restored = checkpointing.restore_variables(os.path.join(directory, VARIABLES_DIR), model)
    except ValueError as e:
        raise PretrainedError(f'{metadata["model_name"]}: {e}') from e
    variables = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype=jnp.float32), restored)
    return model, variables
