"""Weights from either place they live: a pretrained directory or a train.py workdir.

    weights = load_weights(PATH)   # PATH: a directory written by save_pretrained / the converter,
                                   # or a train.py workdir (its best checkpoint, else its latest)
    weights.model, weights.variables, weights.preprocessing, weights.label_names

A workdir describes its model in WORKDIR/metadata.json (written by train.py); a workdir from before
that file existed is read from WORKDIR/config.json, with the class count taken from the checkpoint.
Only the parameters are restored from a workdir checkpoint, not the optimizer state.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import orbax.checkpoint as ocp

from crossformer_jax.models import create_model, model_spec
from crossformer_jax.training import checkpointing
from crossformer_jax.weights import pretrained
from crossformer_jax.weights.pretrained import Preprocessing, PretrainedError

CHECKPOINT_ITEM = 'default'  # orbax CheckpointManager's item directory inside a step


@dataclasses.dataclass(frozen=True)
class LoadedWeights:
    """A Flax module with its variables and what the weights say about their inputs and outputs.

    task: 'classification' (logits (N, num_classes), or pooled features when num_classes is 0),
    'backbone' (features_only: four stage maps), 'segmentation' (logits (N, H, W, classes)) or
    'detection' (RetinaNet: per-level class logits and box deltas, crossformer_jax.models.detection)
    or 'instance_segmentation' ((Cascade) Mask R-CNN's raw outputs,
    crossformer_jax.models.mask_rcnn).
    """

    model: Any
    variables: dict[str, Any]
    model_name: str
    metadata: dict[str, Any]
    preprocessing: Preprocessing
    label_names: list[str] | None
    source: str
    task: str


def task_of(model_name: str, features_only: bool) -> str:
    """The LoadedWeights.task of a model: 'backbone' for features_only, else the registry's
    task ('classification', 'segmentation', 'detection', 'instance_segmentation')."""
    return 'backbone' if features_only else model_spec(model_name).task


def is_workdir(path: str) -> bool:
    return any(
        os.path.isdir(os.path.join(path, d))
        for d in (checkpointing.LATEST_DIR, checkpointing.BEST_DIR)
    )


def load_weights(path: str | os.PathLike, *, dtype: Any = None) -> LoadedWeights:
    """Loads a pretrained directory or a workdir's best checkpoint; PretrainedError when `path`
    is neither or cannot be read (the message names the file and the problem)."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise PretrainedError(f'no weights at {path}: not a directory')
    if is_workdir(path):
        return _load_workdir(path, dtype)
    if not os.path.isfile(os.path.join(path, pretrained.METADATA_FILE)):
        raise PretrainedError(
            f'{path} is neither a pretrained directory ({pretrained.METADATA_FILE} + '
            f'{pretrained.VARIABLES_DIR}/) nor a train.py workdir (checkpoints/)'
        )
    metadata = pretrained.read_metadata(path)
    model, variables = pretrained.load_pretrained(path, dtype=dtype)
    return LoadedWeights(
        model=model,
        variables=variables,
        model_name=metadata['model_name'],
        metadata=metadata,
        preprocessing=pretrained.preprocessing_from_metadata(metadata, path),
        label_names=None
        if metadata['features_only']
        else pretrained.label_names_from_metadata(metadata),
        source=f'pretrained directory {path}',
        task=task_of(metadata['model_name'], bool(metadata['features_only'])),
    )


def _checkpoint_step_dir(workdir: str) -> tuple[str, str]:
    """(directory of the best checkpoint, else the latest, 'best'/'latest at step S')."""
    for which in (checkpointing.BEST_DIR, checkpointing.LATEST_DIR):
        root = os.path.join(workdir, which)
        steps = (
            sorted(
                int(name)
                for name in os.listdir(root)
                if name.isdigit() and os.path.isdir(os.path.join(root, name, CHECKPOINT_ITEM))
            )
            if os.path.isdir(root)
            else []
        )
        if steps:  # 'best' keeps exactly one; 'latest' keeps the last few
            label = 'best' if which == checkpointing.BEST_DIR else 'latest'
            return os.path.join(root, str(steps[-1]), CHECKPOINT_ITEM), f'{label}, step {steps[-1]}'
    raise PretrainedError(f'{workdir} holds no finished checkpoint yet')


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding='utf-8') as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise PretrainedError(f'cannot read {path}: {e}') from e
    if not isinstance(value, dict):
        raise PretrainedError(f'{path} does not hold a JSON object')
    return value


def _workdir_description(workdir: str, checkpoint: str) -> dict[str, Any]:
    """metadata.json, or for older workdirs the same fields rebuilt from config.json."""
    metadata_path = os.path.join(workdir, pretrained.METADATA_FILE)
    if os.path.isfile(metadata_path):
        metadata = _read_json(metadata_path)
        if metadata.get('format') != pretrained.WORKDIR_FORMAT_NAME:
            raise PretrainedError(f'{metadata_path} is not crossformer_jax workdir metadata')
        return metadata
    config_path = os.path.join(workdir, 'config.json')
    if not os.path.isfile(config_path):
        raise PretrainedError(
            f'{workdir} has checkpoints but neither {pretrained.METADATA_FILE} nor config.json '
            'to say which model they belong to'
        )
    config = _read_json(config_path)
    model = dict(config.get('model') or {})
    if 'name' not in model:
        raise PretrainedError(f'{config_path} lacks model.name')
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(checkpoint).item_metadata.tree
    try:
        num_classes = int(tree['params']['head']['bias'].shape[0])
    except (KeyError, TypeError) as e:
        raise PretrainedError(f'{checkpoint} has no params/head/bias to size the head') from e
    data = config.get('data') or {}
    size = int(data.get('image_size', 224))
    described = {
        'model_name': model.pop('name'),
        'num_classes': num_classes,
        'features_only': False,
        'model_overrides': model,
        'input_size': [3, size, size],
    }
    for key, field in (('crop_pct', 'eval_crop_fraction'), ('mean', 'mean'), ('std', 'std')):
        if field in data:
            described[key] = data[field]
    return described


def _load_workdir(workdir: str, dtype: Any) -> LoadedWeights:
    checkpoint, which = _checkpoint_step_dir(workdir)
    metadata = _workdir_description(workdir, checkpoint)
    overrides = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in (metadata.get('model_overrides') or {}).items()
        if k not in ('dtype', 'remat')
    }
    if dtype is not None:
        overrides['dtype'] = dtype
    try:
        model = create_model(
            metadata['model_name'], num_classes=int(metadata['num_classes']), **overrides
        )
    except (KeyError, ValueError) as e:
        raise PretrainedError(f'{workdir}: cannot build the model: {e}') from e
    try:
        variables = checkpointing.restore_variables(checkpoint, model, ('params',))
    except ValueError as e:
        raise PretrainedError(f'{metadata["model_name"]}: {e}') from e
    return LoadedWeights(
        model=model,
        variables=variables,
        model_name=metadata['model_name'],
        metadata=metadata,
        preprocessing=pretrained.preprocessing_from_metadata(metadata, workdir),
        label_names=pretrained.label_names_from_metadata(metadata),
        source=f'workdir {workdir} ({which})',
        task=task_of(metadata['model_name'], features_only=False),
    )
