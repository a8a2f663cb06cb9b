"""The task interface (see crossformer_jax.tasks) and the helpers the tasks share."""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from crossformer_jax.data import pipeline, sources


def model_overrides(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Everything in config.model except the name: keyword overrides for create_model."""
    return {k: v for k, v in config.model.to_dict().items() if k != 'name'}


def check_split_directories(data: ml_collections.ConfigDict, mode: str, kinds=('',)) -> None:
    """Raises ValueError naming the first missing DATA_DIR/<kind>/<split> directory of the splits
    that `mode` reads (the evaluation split; the training split too in 'train')."""
    splits = [data.eval_split] + ([data.train_split] if mode == 'train' else [])
    for split in splits:
        for kind in kinds:
            path = os.path.join(data.data_dir, kind, split)
            if not sources.isdir(path):
                raise ValueError(
                    f'data directory {path!r} does not exist (config.data.data_dir='
                    f'{data.data_dir!r}, split {split!r})'
                )


def backbone_transfer(
    source: dict[str, Any], classifier_layer: str
) -> tuple[dict[str, Any], Callable[[str, Any], bool]]:
    """`Task.pretrained_params` of a model with a CrossFormer `backbone`: a classifier checkpoint
    goes into the backbone (without its final norm and head; everything else starts fresh); a
    checkpoint of the same kind of model loads whole, except that its final class layer (paths
    containing classifier_layer, e.g. '/conv_seg/') may start fresh when its shape differs."""
    into_backbone = not any(path.startswith('backbone/') for path in source)
    if into_backbone:
        source = {
            f'backbone/{path}': value
            for path, value in source.items()
            if not path.startswith(('head/', 'norm/'))
        }

    def may_start_fresh(path: str, loaded) -> bool:
        new_head = into_backbone and not path.startswith('backbone/')
        return new_head or (classifier_layer in path and loaded is not None)

    return source, may_start_fresh


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

    @classmethod
    def dataset_info(cls, data_config) -> sources.DatasetInfo:
        """Classes and split sizes of config.data (default: the tf.data sources)."""
        return sources.get_dataset_info(data_config)

    def steps_per_epoch(self, info: sources.DatasetInfo, batch_size: int) -> int:
        """Global batches in one epoch of the training split (default: whole batches)."""
        return max(info.num_train_examples // batch_size, 1)

    @abc.abstractmethod
    def create_train_iterator(
        self, config: ml_collections.ConfigDict, *, start_step: int
    ) -> Iterator[dict[str, np.ndarray]]:
        """This process's share of the endless training batches (numpy dicts), from global
        batch start_step on, exactly as an uninterrupted run would have seen them."""

    @abc.abstractmethod
    def train_batch_spec(
        self, config: ml_collections.ConfigDict, batch_size: int
    ) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of a global training batch as the input pipeline delivers it."""

    @abc.abstractmethod
    def eval_program(
        self, model: nn.Module, config: ml_collections.ConfigDict
    ) -> tuple[Callable, tuple[Any, ...], int, bool]:
        """(evaluate(variables, *inputs), abstract inputs of one call, images per call, whether
        the inputs are a batch split over the devices): the pure function the evaluator runs on
        each batch or image, which `--mode compile` compiles."""

    def transform_batch(
        self, rng: jax.Array, batch: dict[str, jax.Array], mesh: Mesh
    ) -> dict[str, jax.Array]:
        """On-device transform of the whole global training batch, split over `mesh` (default:
        none)."""
        del rng, mesh
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

    def pretrained_params(
        self, source: dict[str, Any], target: Mapping[str, Any]
    ) -> tuple[dict[str, Any], Callable[[str, Any], bool]]:
        """How a pretrained checkpoint's parameters go into this task's model.

        source and target are flat ('layers_0/blocks_0/attn/qkv/kernel' -> array). Returns the
        source renamed into the model's paths and `may_start_fresh(path, loaded)`: whether the
        model's parameter `path` may keep its fresh initialisation when the checkpoint lacks it
        (loaded None) or holds another shape. Default: the names as they are, nothing fresh.
        """
        del target
        return source, lambda path, loaded: False

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


class TfDataTask(Task):
    """A task fed by the shared tf.data pipeline (crossformer_jax.data.pipeline): it supplies the
    per-example functions, the pipeline does order, sharding, corrupt files and resume."""

    def train_decode(self, data_config, seed: int, process_index: int) -> Callable:
        """load_fn -> (encoded element -> decoded tensors); default: whole image (+ label map)."""
        del data_config, seed, process_index
        return pipeline.decode_whole

    @abc.abstractmethod
    def train_preprocess(self, data_config, seed: int, process_index: int) -> Callable:
        """tf.data map function: decoded element -> training example (augmented)."""

    @abc.abstractmethod
    def eval_preprocess(self, data_config) -> Callable:
        """tf.data map function: decoded element -> evaluation example."""

    def create_train_iterator(self, config, *, start_step):
        process_index = jax.process_index()
        return pipeline.create_train_iterator(
            config.data,
            local_batch_size=config.batch_size // jax.process_count(),
            seed=config.seed,
            start_step=start_step,
            process_index=process_index,
            process_count=jax.process_count(),
            decode=self.train_decode(config.data, config.seed, process_index),
            preprocess=self.train_preprocess(config.data, config.seed, process_index),
        )
