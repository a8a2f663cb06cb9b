"""Saving and loading converted (or trained) CrossFormer weights as a self-describing directory.

Layout of a pretrained directory:

    DIR/metadata.json   model name, num_classes, features_only, create_model overrides,
                        converter version and whatever extra metadata the writer added
    DIR/variables/      orbax checkpoint of the Flax variables {'params': ...}

`save_pretrained` is atomic: everything is written into a hidden temporary sibling directory
(`.DIR.tmp-XXXX`) which is renamed to DIR only once complete, so an interrupted run never leaves a
half-written DIR (at most a stale hidden temporary directory, safe to delete). An existing DIR is
refused unless overwrite=True, and then only replaced after the new one is complete; to avoid
deleting unrelated data by accident, overwrite only replaces an empty directory or an earlier
pretrained directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

METADATA_FILE = 'metadata.json'
VARIABLES_DIR = 'variables'
FORMAT_NAME = 'crossformer_jax.pretrained'
FORMAT_VERSION = 1

# JSON-friendly create_model overrides that describe the architecture (dtype / remat are runtime
# choices and are not stored).
_STORABLE_OVERRIDES = (
    'embed_dim',
    'depths',
    'num_heads',
    'group_size',
    'interval',
    'version',
    'mlp_ratio',
    'patch_kernel_sizes',
    'merge_kernel_sizes',
    # Segmentation heads (crossformer_jax.segmentation).
    'head_channels',
    'aux_channels',
    'neck_channels',
)


class PretrainedError(ValueError):
    """A pretrained directory that cannot be written or read."""


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
) -> str:
    """Writes `variables` ({'params': ...}) and metadata to `directory`, atomically.

    model_overrides: architecture overrides of `create_model` (e.g. depths for a reduced model),
    stored so that `load_pretrained` rebuilds the same module. Returns the absolute directory.
    """
    import jax
    import orbax.checkpoint as ocp

    from crossformer_jax.convert import CONVERTER_VERSION

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

    metadata = {
        'format': FORMAT_NAME,
        'format_version': FORMAT_VERSION,
        'model_name': model_name,
        'num_classes': None
        if features_only
        else int(num_classes if num_classes is not None else 1000),
        'features_only': bool(features_only),
        'model_overrides': {k: _json_value(v) for k, v in overrides.items()},
        'converter_version': CONVERTER_VERSION,
        'num_params': int(sum(np.size(x) for x in jax.tree_util.tree_leaves(variables['params']))),
    }
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
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from crossformer_jax.crossformer import create_model

    directory = os.path.abspath(os.fspath(directory))
    metadata = read_metadata(directory)
    overrides = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in (metadata.get('model_overrides') or {}).items()
    }
    if dtype is not None:
        overrides['dtype'] = dtype
    features_only = bool(metadata['features_only'])
    num_classes = metadata.get('num_classes') or 1000
    try:
        model = create_model(
            metadata['model_name'],
            num_classes=num_classes,
            features_only=features_only,
            **overrides,
        )
    except ValueError as e:
        raise PretrainedError(f'{directory}: cannot build the model: {e}') from e
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), abstract
    )
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(os.path.join(directory, VARIABLES_DIR), abstract)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PretrainedError(
            f'cannot restore the variables in {directory} for '
            f'{metadata["model_name"]}: {first[:300]}'
        ) from e
    variables = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype=jnp.float32), restored)
    return model, variables
