"""One registry for every model family: a name -> the task it serves and how to build it.

Each family's file registers its variants at its end (`register_model`); importing
`crossformer_jax.models` imports every family, so `create_model` and `list_models` see them all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registered model: `build(name, num_classes, **kwargs)` returns its Flax module."""

    name: str
    task: str  # the trainer's task that trains it (crossformer_jax.tasks)
    num_classes: int  # the default, that of the released checkpoints
    build: Callable[..., nn.Module]


_MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, *, task: str, num_classes: int, build: Callable[..., nn.Module]):
    """Adds a model under `name`; ValueError for a taken name."""
    if name in _MODELS:
        raise ValueError(f'model {name!r} is already registered')
    _MODELS[name] = ModelSpec(name, task, num_classes, build)


def model_spec(name: str) -> ModelSpec:
    """The registered model `name`; ValueError listing the available names otherwise."""
    if name not in _MODELS:
        raise ValueError(f'unknown model {name!r}; available: {", ".join(list_models())}')
    return _MODELS[name]


def list_models(task: str | None = None) -> list[str]:
    """Registered names of one task, or of all (task by task, in the order the families were
    registered: classifiers first), each task's sorted."""
    tasks = dict.fromkeys(spec.task for spec in _MODELS.values())
    return [
        name
        for t in tasks
        if task in (None, t)
        for name in sorted(spec.name for spec in _MODELS.values() if spec.task == t)
    ]


def create_model(name: str, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """A registered model as a Flax module, timm-style.

    num_classes defaults to the released checkpoints' (1000 for classifiers, 150 for the ADE20K
    models). Classifiers also take num_classes=0 (no head: pooled features), features_only=True
    (the four stage maps) and out_indices; every family takes overrides of its constructor fields.
    """
    spec = model_spec(name)
    return spec.build(name, spec.num_classes if num_classes is None else num_classes, **kwargs)
