"""Image classification: mixup/CutMix targets, soft-target cross-entropy, top-1 / top-5."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from crossformer_jax import models
from crossformer_jax.augment import batch_ops, mixup
from crossformer_jax.data import classification as classification_data
from crossformer_jax.data import pipeline, sources
from crossformer_jax.models import crossformer
from crossformer_jax.runtime import sharding as sharding_lib
from crossformer_jax.runtime.compile_options import inference_compiler_options
from crossformer_jax.tasks.base import TfDataTask, check_split_directories, model_overrides
from crossformer_jax.weights import pretrained


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over the batch of -sum_c targets_c log softmax(logits)_c (targets sum to 1)."""
    return jnp.mean(jnp.sum(-targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1))


def eval_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Sums of loss / top-1 / top-5 hits over the real (mask true) rows.

    logits (B, K), labels (B,) int, mask (B,) bool; padded rows count for nothing whatever
    their labels.
    """
    logits = logits.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    num_classes = logits.shape[-1]
    losses = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
    top1 = jnp.argmax(logits, axis=-1) == labels
    _, top5_classes = jax.lax.top_k(logits, min(5, num_classes))
    top5 = jnp.any(top5_classes == labels[:, None], axis=-1)
    return {
        'loss': jnp.sum(losses * mask),
        'top1': jnp.sum(top1 * mask),
        'top5': jnp.sum(top5 * mask),
        'count': jnp.sum(mask),
    }


def eval_step(
    variables: Any,
    batch: dict[str, jax.Array],
    *,
    model: nn.Module,
    data_config: ml_collections.ConfigDict,
):
    """eval_sums of the model's logits on an evaluation batch {'image' uint8, 'label', 'mask'}."""
    images = batch_ops.eval_images(batch['image'], data_config)
    logits = model.apply(variables, images, train=False)
    return eval_sums(logits, batch['label'], batch['mask'])


@dataclasses.dataclass(frozen=True)
class ClassificationTask(TfDataTask):
    """num_classes classes; mixup: config.mixup (both alphas 0: only label smoothing); data:
    config.data (normalisation and random erasing on the device)."""

    num_classes: int
    mixup: ml_collections.ConfigDict
    data: ml_collections.ConfigDict
    image_size: int = 224

    name: ClassVar[str] = 'classification'
    best_metric: ClassVar[str] = 'top1'

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict, *, mode: str) -> None:
        name = config.model.name
        if name not in crossformer.VARIANTS:
            raise ValueError(
                f'unknown model {name!r} (config.model.name); available: '
                f'{", ".join(models.list_models("classification"))}'
            )
        try:
            crossformer.model_config(name, **model_overrides(config))
        except ValueError as e:
            raise ValueError(f'config.model: {e}') from None
        size = config.data.image_size
        if size <= 0 or size % 32:
            raise ValueError(
                f'config.data.image_size must be a positive multiple of 32, got {size}'
            )
        if mode not in ('train', 'evaluate'):
            return
        data = config.data
        try:
            batch_ops.randaugment_config(data)
        except ValueError as e:
            raise ValueError(f'config.data.randaugment: {e}') from None
        batch_ops.randaugment_fill(data)
        if data.dataset == 'image_folder':
            if not data.data_dir:
                raise ValueError("config.data.data_dir must be set for dataset 'image_folder'")
            check_split_directories(data, mode)
        elif data.dataset == 'imagenet2012':
            if data.data_dir and not sources.isdir(data.data_dir):
                raise ValueError(f'config.data.data_dir={data.data_dir!r} does not exist')
        else:
            raise ValueError(
                f"config.data.dataset must be 'imagenet2012' or 'image_folder', got "
                f'{data.dataset!r}'
            )

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, num_classes: int) -> ClassificationTask:
        return cls(
            num_classes=num_classes,
            mixup=config.mixup,
            data=config.data,
            image_size=config.data.image_size,
        )

    def create_model(self, config: ml_collections.ConfigDict) -> nn.Module:
        return models.create_model(
            config.model.name, num_classes=self.num_classes, **model_overrides(config)
        )

    def init_variables(self, model: nn.Module, rng: jax.Array) -> dict[str, Any]:
        images = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
        return {'params': model.init(rng, images)['params']}

    def train_decode(self, data_config, seed: int, process_index: int) -> Callable:
        """Decoded and cropped to their random resized crop window (before resizing)."""
        return functools.partial(
            classification_data.train_decode,
            data_config,
            seed=seed,
            process_index=process_index,
        )

    def train_preprocess(self, data_config, seed: int, process_index: int) -> Callable:
        return classification_data.train_preprocess(data_config, seed, process_index)

    def eval_preprocess(self, data_config) -> Callable:
        return classification_data.eval_preprocess(data_config)

    def transform_batch(
        self, rng: jax.Array, batch: dict[str, jax.Array], mesh: Mesh
    ) -> dict[str, jax.Array]:
        """{'image' uint8, 'label'} -> {'image' float32, 'target' (B, K)}: RandAugmented,
        normalised, randomly erased (per example), then mixed as a whole."""
        augment_rng, mix_rng = jax.random.split(rng)
        images = batch_ops.train_images(batch['image'], augment_rng, self.data, mesh)
        m = self.mixup
        images, targets = mixup.mix_batch(
            mix_rng,
            images,
            batch['label'],
            num_classes=self.num_classes,
            mixup_alpha=m.mixup_alpha,
            cutmix_alpha=m.cutmix_alpha,
            switch_prob=m.switch_prob,
            label_smoothing=m.label_smoothing,
        )
        return {'image': images, 'target': targets}

    def loss(self, model, params, model_state, batch, rng):
        logits = model.apply(
            {'params': params, **model_state}, batch['image'], train=True, rngs={'dropout': rng}
        )
        return soft_target_cross_entropy(logits, batch['target']), model_state

    def train_batch_spec(self, config, batch_size):
        size = self.image_size
        return {
            'image': jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8),
            'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32),
        }

    def eval_program(self, model, config):
        b, size = config.eval_batch_size, self.image_size
        batch = {
            'image': jax.ShapeDtypeStruct((b, size, size, 3), jnp.uint8),
            'label': jax.ShapeDtypeStruct((b,), jnp.int32),
            'mask': jax.ShapeDtypeStruct((b,), jnp.bool_),
        }
        return functools.partial(eval_step, model=model, data_config=self.data), (batch,), b, True

    def make_evaluator(self, model, mesh, variables_sharding, config):
        """One pass of global, sharded batches; the jit's replicated sums cover every host."""
        p_eval_step = jax.jit(
            self.eval_program(model, config)[0],
            in_shardings=(variables_sharding, sharding_lib.batch_sharding(mesh)),
            out_shardings=sharding_lib.replicated(mesh),
            compiler_options=inference_compiler_options(),
        )

        def evaluate(variables):
            eval_iter = pipeline.create_eval_iterator(
                config.data,
                local_batch_size=config.eval_batch_size // jax.process_count(),
                process_index=jax.process_index(),
                process_count=jax.process_count(),
                preprocess=self.eval_preprocess(config.data),
            )
            totals = None
            for batch in sharding_lib.prefetch_to_device(eval_iter, mesh):
                sums = p_eval_step(variables, batch)
                totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
            if totals is None:
                raise ValueError('the validation split is empty')
            return jax.tree.map(np.asarray, jax.device_get(totals))

        return evaluate

    def pretrained_params(self, source, target):
        """A classifier checkpoint as it is; its head (another number of classes) and, from a
        backbone-only checkpoint, the final norm may start fresh."""
        del target

        def may_start_fresh(path: str, loaded) -> bool:
            return path.startswith('head/') or (path.startswith('norm/') and loaded is None)

        return source, may_start_fresh

    @classmethod
    def preprocessing(cls, config):
        """Resize to image_size / eval_crop_fraction, centre crop, mean/std (on 0..1 pixels)."""
        data = config.data
        return pretrained.Preprocessing(
            input_size=(data.image_size, data.image_size),
            crop_pct=float(data.eval_crop_fraction),
            interpolation='bicubic',  # the input pipeline's evaluation resize
            mean=tuple(data.mean),
            std=tuple(data.std),
        )

    def final_metrics(self, sums):
        count = float(sums['count'])
        return {
            'top1': float(sums['top1']) / count,
            'top5': float(sums['top5']) / count,
            'loss': float(sums['loss']) / count,
            'count': int(count),
        }

    @staticmethod
    def describe(metrics):
        return (
            f'top-1 {100 * metrics["top1"]:.2f}% | top-5 {100 * metrics["top5"]:.2f}% | '
            f'loss {metrics["loss"]:.4f} | {metrics["count"]} images'
        )
