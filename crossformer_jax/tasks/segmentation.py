"""Semantic segmentation: per-pixel cross-entropy (+ auxiliary head), mIoU / aAcc / mAcc.

Training batches are {'image' (B, S, S, 3), 'label' (B, S, S) int32 with IGNORE_INDEX}. Evaluation
runs image by image at each image's own size ("whole" mode, crossformer_jax.data.ade20k):
logits of every scale (and flip) are resized to the original label size, softmax-averaged when
there are several, and the argmax is counted into a (K, K) confusion matrix (rows: label, columns:
prediction). The images of a host go round-robin to its local devices; the matrices are summed
over the host's devices, then over hosts.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from crossformer_jax import models
from crossformer_jax.data import ade20k
from crossformer_jax.models import segmentation
from crossformer_jax.runtime import sharding as sharding_lib
from crossformer_jax.runtime.compile_options import inference_compiler_options
from crossformer_jax.tasks.base import (
    TfDataTask,
    backbone_transfer,
    check_split_directories,
    model_overrides,
)
from crossformer_jax.weights import pretrained

IGNORE_INDEX = ade20k.IGNORE_INDEX


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Cross-entropy per pixel, IGNORE_INDEX pixels counting 0, averaged over all pixels.

    logits (B, H, W, K), labels (B, H, W) int.
    """
    logits = logits.astype(jnp.float32)
    valid = (labels >= 0) & (labels < logits.shape[-1])
    safe = jnp.where(valid, labels, 0)
    log_probs = jax.nn.log_softmax(logits)
    losses = -jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, losses, 0.0)) / labels.size


def confusion_matrix(predictions: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
    """(K, K) int32 counts of (label, prediction) pairs over labelled pixels (label in [0, K))."""
    valid = (labels >= 0) & (labels < num_classes)
    index = jnp.where(valid, labels * num_classes + predictions, num_classes * num_classes)
    counts = jnp.bincount(index.reshape(-1), length=num_classes * num_classes + 1)
    return counts[:-1].reshape(num_classes, num_classes).astype(jnp.int32)


def segmentation_metrics(confusion: np.ndarray) -> dict[str, float]:
    """mIoU (mean over classes with a non-empty union), aAcc (pixel accuracy) and mAcc (mean
    over classes that occur in the labels) of a (K, K) confusion matrix (rows: label)."""
    confusion = np.asarray(confusion, np.float64)
    intersection = np.diag(confusion)
    label_area = confusion.sum(axis=1)
    union = label_area + confusion.sum(axis=0) - intersection
    if label_area.sum() == 0:
        raise ValueError('no labelled pixel was evaluated')
    return {
        'miou': float(np.mean(intersection[union > 0] / union[union > 0])),
        'aacc': float(intersection.sum() / label_area.sum()),
        'macc': float(np.mean(intersection[label_area > 0] / label_area[label_area > 0])),
    }


def predict_confusion(
    variables: Any,
    images: Sequence[jax.Array],
    label: jax.Array,
    *,
    model: nn.Module,
    num_classes: int,
    flip: bool,
) -> jax.Array:
    """Confusion matrix of one image: images (h_r, w_r, 3) one per scale, label (H, W)."""
    height, width = label.shape

    def logits_at(image):
        logits = model.apply(variables, image[None], train=False)[0].astype(jnp.float32)
        return jax.image.resize(
            logits, (height, width, logits.shape[-1]), 'bilinear', antialias=False
        )

    average = len(images) > 1 or flip  # one plain pass: argmax of the logits
    total = jnp.zeros((height, width, num_classes), jnp.float32)
    for image in images:
        views = [(image, False)] + ([(image[:, ::-1], True)] if flip else [])
        for view, flipped in views:
            logits = logits_at(view)
            logits = logits[:, ::-1] if flipped else logits
            total = total + (jax.nn.softmax(logits) if average else logits)
    return confusion_matrix(jnp.argmax(total, axis=-1), label, num_classes)


def _on_device(x: jax.Array, device) -> jax.Array:
    """The copy of a fully replicated array that lives on device."""
    return next(shard.data for shard in x.addressable_shards if shard.device == device)


@dataclasses.dataclass(frozen=True)
class SegmentationTask(TfDataTask):
    """num_classes classes on image_size crops; aux_weight scales the auxiliary head's loss."""

    num_classes: int
    image_size: int = 512
    aux_weight: float = 0.4
    eval_scales: tuple[float, ...] = (1.0,)
    eval_flip: bool = False

    name: ClassVar[str] = 'segmentation'
    best_metric: ClassVar[str] = 'miou'

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict, *, mode: str) -> None:
        name = config.model.name
        try:
            segmentation.segmentation_config(name, **model_overrides(config))
        except ValueError as e:
            raise ValueError(f'config.model: {e}') from None
        size = config.data.image_size
        if size <= 0 or size % 32:
            raise ValueError(
                f'config.data.image_size (the training crop) must be a positive multiple of 32, '
                f'got {size}'
            )
        scales = tuple(config.eval.scales)
        if not scales or min(scales) <= 0:
            raise ValueError(f'config.eval.scales must be positive ratios, got {scales}')
        if mode not in ('train', 'evaluate'):
            return
        data = config.data
        if data.dataset != 'ade20k':
            raise ValueError(
                f"config.data.dataset must be 'ade20k' (DATA_DIR/images|annotations/<split>/) "
                f'for segmentation, got {data.dataset!r}'
            )
        check_split_directories(data, mode, kinds=('images', 'annotations'))

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, num_classes: int) -> SegmentationTask:
        return cls(
            num_classes=num_classes,
            image_size=config.data.image_size,
            aux_weight=config.aux_loss_weight,
            eval_scales=tuple(float(s) for s in config.eval.scales),
            eval_flip=bool(config.eval.flip),
        )

    def create_model(self, config: ml_collections.ConfigDict) -> nn.Module:
        return models.create_model(
            config.model.name, num_classes=self.num_classes, **model_overrides(config)
        )

    def init_variables(self, model: nn.Module, rng: jax.Array) -> dict[str, Any]:
        images = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
        return dict(flax.core.unfreeze(model.init(rng, images)))

    def train_preprocess(self, data_config, seed: int, process_index: int):
        return ade20k.train_preprocess(data_config, seed, process_index)

    def eval_preprocess(self, data_config):
        return ade20k.eval_preprocess(data_config, self.eval_scales)

    def loss(self, model, params, model_state, batch, rng):
        (logits, aux_logits), updates = model.apply(
            {'params': params, **model_state},
            batch['image'],
            train=True,
            rngs={'dropout': rng},
            mutable=list(model_state),
        )
        loss = pixel_cross_entropy(logits, batch['label'])
        if aux_logits is not None:
            loss = loss + self.aux_weight * pixel_cross_entropy(aux_logits, batch['label'])
        return loss, dict(updates)

    def train_batch_spec(self, config, batch_size):
        size = self.image_size
        return {
            'image': jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32),
            'label': jax.ShapeDtypeStruct((batch_size, size, size), jnp.int32),
        }

    def eval_program(self, model, config):
        """One whole image per call; compiled here at the training crop size (the evaluator
        compiles once per distinct image size)."""
        size = self.image_size
        images = tuple(
            jax.ShapeDtypeStruct((round(size * s), round(size * s), 3), jnp.float32)
            for s in self.eval_scales
        )
        label = jax.ShapeDtypeStruct((size, size), jnp.int32)
        evaluate = functools.partial(
            predict_confusion, model=model, num_classes=self.num_classes, flip=self.eval_flip
        )
        return evaluate, (images, label), 1, False

    def make_evaluator(self, model, mesh, variables_sharding, config):
        """Whole images, one at a time, round-robin over this host's devices (any image size;
        one compilation per distinct size)."""
        local_devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
        replicate = jax.jit(lambda v: v, out_shardings=sharding_lib.replicated(mesh))
        step = jax.jit(
            self.eval_program(model, config)[0], compiler_options=inference_compiler_options()
        )

        def evaluate(variables):
            full = replicate(variables)
            copies = {d: jax.tree.map(lambda x, d=d: _on_device(x, d), full) for d in local_devices}
            examples = ade20k.create_eval_examples(
                config.data,
                scales=self.eval_scales,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
            )
            confusion = np.zeros((self.num_classes, self.num_classes), np.int64)
            pending, count = [], 0
            for example in examples:
                device = local_devices[count % len(local_devices)]
                images = tuple(jax.device_put(x, device) for x in example['images'])
                label = jax.device_put(example['label'], device)
                pending.append(step(copies[device], images, label))
                count += 1
                if len(pending) >= 4 * len(local_devices):  # int32 per image, int64 on the host
                    confusion += np.sum(jax.device_get(pending), axis=0, dtype=np.int64)
                    pending = []
            if pending:
                confusion += np.sum(jax.device_get(pending), axis=0, dtype=np.int64)
            sums = {'confusion': confusion, 'count': np.int64(count)}
            if jax.process_count() > 1:
                gathered = multihost_utils.process_allgather(sums)
                sums = {k: np.sum(v, axis=0) for k, v in gathered.items()}
            if sums['count'] == 0:
                raise ValueError('the validation split is empty')
            return sums

        return evaluate

    def pretrained_params(self, source, target):
        """A classifier checkpoint goes into the `backbone` (the segmentation heads start
        fresh); a segmentation checkpoint with another number of classes keeps fresh `conv_seg`
        layers."""
        del target
        return backbone_transfer(source, '/conv_seg/')

    @classmethod
    def preprocessing(cls, config):
        """The whole image fitted into image_size (bilinear), mean/std of config (0..255) on the
        0..1 scale that pretrained.Preprocessing uses."""
        data = config.data
        return pretrained.Preprocessing(
            input_size=(data.image_size, data.image_size),
            crop_pct=1.0,
            interpolation='bilinear',
            mean=tuple(m / 255.0 for m in data.mean),
            std=tuple(s / 255.0 for s in data.std),
        )

    def final_metrics(self, sums):
        return segmentation_metrics(sums['confusion']) | {'count': int(sums['count'])}

    @staticmethod
    def describe(metrics):
        return (
            f'mIoU {100 * metrics["miou"]:.2f}% | aAcc {100 * metrics["aacc"]:.2f}% | '
            f'mAcc {100 * metrics["macc"]:.2f}% | {metrics["count"]} images'
        )
