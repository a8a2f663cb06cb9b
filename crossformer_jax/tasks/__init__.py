"""What the trainer trains: the task interface, and `get_task(config, num_classes)`.

The loop in crossformer_jax.training is task-agnostic: sharding, the optimizer, checkpoints,
preemption, resume, logging and the data sources are shared. A task supplies the rest:

* `create_model(config)` and `init_variables(model, rng)`: the Flax module and its variables
  (`{'params': ..., <model state such as 'batch_stats'>}`);
* `train_decode(data_config, seed, process_index)`: how a training element is decoded (a factory
  `load_fn -> (element -> dict of decoded tensors)`, its failures mark corrupt files;
  default: the whole image, and the label map where there is one);
* `train_preprocess(data_config, seed, process_index)` / `eval_preprocess(data_config)`: per-example
  tf.data functions (decoded element dict -> example dict) handed to the shared input pipeline;
* `transform_batch(rng, batch)`: an on-device transform of the global training batch (mixup);
* `loss(model, params, model_state, batch, rng)` -> (scalar loss, new model state);
* `make_evaluator(model, mesh, variables_sharding, config)`: a callable that runs one pass over the
  validation split and returns sums that add across batches and hosts (numpy dict);
* `preprocessing(config)`: how a trained model's inputs are prepared at inference (stored with the
  weights for predict.py);
* `final_metrics(sums)` -> floats, `best_metric`: the metric (higher is better) that picks the best
  checkpoint, and `describe(metrics)`: the metrics as one log-line fragment.

Batches are dicts, so a task defines its own targets (class ids, label maps, boxes...).
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import ml_collections
import numpy as np

TASKS = ('classification', 'segmentation')


def model_overrides(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Everything in config.model except the name: keyword overrides for create_model."""
    return {k: v for k, v in config.model.to_dict().items() if k != 'name'}


def check_split_directories(data: ml_collections.ConfigDict, mode: str, kinds=('',)) -> None:
    """Raises ValueError naming the first missing DATA_DIR/<kind>/<split> directory of the splits
    that `mode` reads (the evaluation split; the training split too in 'train')."""
    from crossformer_jax.training import _isdir

    splits = [data.eval_split] + ([data.train_split] if mode == 'train' else [])
    for split in splits:
        for kind in kinds:
            path = os.path.join(data.data_dir, kind, split)
            if not _isdir(path):
                raise ValueError(
                    f'data directory {path!r} does not exist (config.data.data_dir='
                    f'{data.data_dir!r}, split {split!r})'
                )


class Task(abc.ABC):
    """One kind of training problem (see the module docstring for the contract)."""

    name: ClassVar[str]
    best_metric: ClassVar[str]
    num_classes: int

    @classmethod
    @abc.abstractmethod
    def check_config(cls, config: ml_collections.ConfigDict, *, mode: str) -> None:
        """Raises ValueError naming the field when config cannot work for this task in mode
        ('train', 'evaluate' or 'throughput'): unknown model, bad sizes, missing data..."""

    @classmethod
    @abc.abstractmethod
    def from_config(cls, config: ml_collections.ConfigDict, num_classes: int) -> Task:
        """The task as config describes it, for num_classes classes."""

    @abc.abstractmethod
    def create_model(self, config: ml_collections.ConfigDict) -> nn.Module:
        """The Flax module of config.model with this task's number of classes."""

    @abc.abstractmethod
    def init_variables(self, model: nn.Module, rng: jax.Array) -> dict[str, Any]:
        """Fresh variables: 'params' and any model state collections."""

    def train_decode(self, data_config, seed: int, process_index: int) -> Callable:
        """load_fn -> (encoded element -> decoded tensors); default: whole image (+ label map)."""
        del data_config, seed, process_index
        from crossformer_jax import input_pipeline

        return input_pipeline.decode_whole

    @abc.abstractmethod
    def train_preprocess(self, data_config, seed: int, process_index: int) -> Callable:
        """tf.data map function: decoded element -> training example (augmented)."""

    @abc.abstractmethod
    def eval_preprocess(self, data_config) -> Callable:
        """tf.data map function: decoded element -> evaluation example."""

    def transform_batch(self, rng: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """On-device transform of the whole global training batch (default: none)."""
        del rng
        return batch

    @abc.abstractmethod
    def loss(
        self,
        model: nn.Module,
        params: Any,
        model_state: dict[str, Any],
        batch: dict[str, jax.Array],
        rng: jax.Array,
    ) -> tuple[jax.Array, dict[str, Any]]:
        """Training loss of a (micro-)batch and the updated model state."""

    @abc.abstractmethod
    def make_evaluator(
        self, model: nn.Module, mesh, variables_sharding: Any, config: ml_collections.ConfigDict
    ) -> Callable[[dict[str, Any]], dict[str, np.ndarray]]:
        """variables -> sums over the whole validation split, all hosts included."""

    @classmethod
    @abc.abstractmethod
    def preprocessing(cls, config: ml_collections.ConfigDict):
        """The inference preprocessing of config (a pretrained.Preprocessing)."""

    @abc.abstractmethod
    def final_metrics(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
        """Metrics (floats) from the evaluation sums."""

    @staticmethod
    @abc.abstractmethod
    def describe(metrics: dict[str, float]) -> str:
        """The metrics as a short log fragment, e.g. 'top-1 76.10% | top-5 ...'."""


def task_class(config: ml_collections.ConfigDict) -> type[Task]:
    """The Task subclass named by config.task ('classification' when absent)."""
    name = config.get('task', 'classification')
    if name == 'classification':
        from crossformer_jax.tasks.classification import ClassificationTask

        return ClassificationTask
    if name == 'segmentation':
        from crossformer_jax.tasks.segmentation import SegmentationTask

        return SegmentationTask
    raise ValueError(f'unknown config.task {name!r}; available: {", ".join(TASKS)}')


def get_task(config: ml_collections.ConfigDict, num_classes: int) -> Task:
    """The task of config.task for a dataset of num_classes classes."""
    return task_class(config).from_config(config, num_classes)
