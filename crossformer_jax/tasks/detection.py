"""Object detection on COCO: RetinaNet's focal + L1 losses, COCO box AP.

Training batches come from the host-side COCO loader (crossformer_jax.data.coco): {'image' uint8
(B, Hc, Wc, 3) on a zero-padded canvas, 'image_size' (B, 2) the resized image's height and width,
'boxes' (B, M, 4) xyxy in resized pixels, 'classes' (B, M), 'box_mask' (B, M)}. A batch holds
images of one orientation, so there are two canvas shapes (landscape and portrait, each the recipe's
scale padded to a multiple of 32) and two compiled train steps. On the device the images are
normalised and their padding set back to zero (the recipe normalises before padding).

Evaluation runs the same canvases through `detect` (fixed-size outputs: 100 boxes per image),
brings the boxes back to the original image, gathers every host's detections (the outputs are
replicated) and scores them with pycocotools against the split's annotation file.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging
from jax.sharding import Mesh

from crossformer_jax import models
from crossformer_jax.data import coco
from crossformer_jax.detection import losses, postprocess
from crossformer_jax.detection.anchors import pad_shape
from crossformer_jax.evaluators import coco as coco_evaluator
from crossformer_jax.models import detection
from crossformer_jax.runtime import sharding as sharding_lib
from crossformer_jax.runtime.compile_options import inference_compiler_options
from crossformer_jax.tasks.base import Task, backbone_transfer, model_overrides
from crossformer_jax.weights import pretrained


def normalize_canvas(
    images: jax.Array, image_sizes: jax.Array, mean, std, dtype=jnp.float32
) -> jax.Array:
    """uint8 (B, H, W, 3) canvases -> (images - mean) / std, zero outside each image's
    (height, width) = image_sizes[b] top-left region; mean and std on the 0..255 scale."""
    x = (images.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(
        std, jnp.float32
    )
    rows = jnp.arange(images.shape[1])[None, :, None] < image_sizes[:, 0, None, None]
    cols = jnp.arange(images.shape[2])[None, None, :] < image_sizes[:, 1, None, None]
    return jnp.where((rows & cols)[..., None], x, 0.0).astype(dtype)


def detect_step(
    variables: Any,
    batch: dict[str, jax.Array],
    *,
    model: nn.Module,
    data_config: ml_collections.ConfigDict,
) -> dict[str, jax.Array]:
    """Detections of an evaluation batch, boxes in original image pixels (divided by each
    image's (B, 4) box scale), with the batch's 'image_id' and 'mask' passed through."""
    images = normalize_canvas(
        batch['image'], batch['image_size'], data_config.mean, data_config.std
    )
    class_logits, box_deltas = model.apply(variables, images, train=False)
    found = postprocess.detect(
        class_logits, box_deltas, model.anchor_generator, batch['image_size']
    )
    found['boxes'] = found['boxes'] / batch['scale_factor'][:, None, :]
    return found | {'image_id': batch['image_id'], 'mask': batch['mask']}


@dataclasses.dataclass(frozen=True)
class DetectionTask(Task):
    """num_classes object classes; data: config.data (COCO fields, crossformer_jax.data.coco)."""

    num_classes: int
    data: ml_collections.ConfigDict

    name: ClassVar[str] = 'detection'
    best_metric: ClassVar[str] = 'AP'
    metric_names: ClassVar[tuple[str, ...]] = coco_evaluator.METRIC_NAMES

    @classmethod
    def check_model(cls, config: ml_collections.ConfigDict) -> None:
        """Raises ValueError when config.model is not a detector this task trains."""
        detection.detection_config(config.model.name, **model_overrides(config))

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict, *, mode: str) -> None:
        try:
            cls.check_model(config)
        except ValueError as e:
            raise ValueError(f'config.model: {e}') from None
        data = config.data
        scale = tuple(coco.coco_field(data, 'image_scale'))
        divisor = coco.coco_field(data, 'size_divisor')
        if len(scale) != 2 or min(scale) <= 0:
            raise ValueError(f'config.data.image_scale must be (long, short) > 0, got {scale}')
        if divisor <= 0 or divisor % 32:
            raise ValueError(f'config.data.size_divisor must be a multiple of 32, got {divisor}')
        if mode not in ('train', 'evaluate'):
            return
        if data.dataset != 'coco':
            raise ValueError(
                "config.data.dataset must be 'coco' (DATA_DIR/<split>/ images and "
                f'DATA_DIR/annotations/instances_<split>.json) for detection, got {data.dataset!r}'
            )
        splits = [data.eval_split] + ([data.train_split] if mode == 'train' else [])
        for split in splits:
            for path in (
                os.path.join(data.data_dir, split),
                coco.annotation_path(data.data_dir, split),
            ):
                if not tf.io.gfile.exists(path):
                    raise ValueError(
                        f'{path!r} does not exist (config.data.data_dir={data.data_dir!r}, '
                        f'split {split!r})'
                    )

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, num_classes: int) -> DetectionTask:
        return cls(num_classes=num_classes, data=config.data)

    @classmethod
    def dataset_info(cls, data_config):
        return coco.dataset_info(data_config)

    def steps_per_epoch(self, info, batch_size: int) -> int:
        return coco.steps_per_epoch(self.data, global_batch_size=batch_size)

    def create_model(self, config: ml_collections.ConfigDict) -> nn.Module:
        return models.create_model(
            config.model.name, num_classes=self.num_classes, **model_overrides(config)
        )

    def init_variables(self, model: nn.Module, rng: jax.Array) -> dict[str, Any]:
        """Parameters and, for a cascade, its box heads' BatchNorm statistics (their shapes do
        not depend on the image size)."""
        return dict(model.init(rng, jnp.zeros((1, 64, 64, 3), jnp.float32)))

    def create_train_iterator(self, config, *, start_step):
        return coco.create_train_iterator(
            config.data,
            global_batch_size=config.batch_size,
            seed=config.seed,
            start_step=start_step,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    def _canvas(self) -> tuple[int, int]:
        """The landscape canvas (height, width) of config.data."""
        landscape, _ = coco.bucket_shapes(
            tuple(coco.coco_field(self.data, 'image_scale')),
            coco.coco_field(self.data, 'size_divisor'),
        )
        return landscape

    def train_batch_spec(self, config, batch_size):
        height, width = self._canvas()
        max_boxes = coco.coco_field(config.data, 'max_boxes')
        return {
            'image': jax.ShapeDtypeStruct((batch_size, height, width, 3), jnp.uint8),
            'image_size': jax.ShapeDtypeStruct((batch_size, 2), jnp.int32),
            'boxes': jax.ShapeDtypeStruct((batch_size, max_boxes, 4), jnp.float32),
            'classes': jax.ShapeDtypeStruct((batch_size, max_boxes), jnp.int32),
            'box_mask': jax.ShapeDtypeStruct((batch_size, max_boxes), jnp.bool_),
        }

    def transform_batch(
        self, rng: jax.Array, batch: dict[str, jax.Array], mesh: Mesh
    ) -> dict[str, jax.Array]:
        """Normalises the canvases (the flips and resizing happened on the host)."""
        del rng, mesh
        images = normalize_canvas(
            batch['image'], batch['image_size'], self.data.mean, self.data.std
        )
        return batch | {'image': images}

    def loss(self, model, params, model_state, batch, rng):
        class_logits, box_deltas = model.apply(
            {'params': params, **model_state}, batch['image'], train=True, rngs={'dropout': rng}
        )
        loss, _ = losses.retinanet_loss(
            class_logits,
            box_deltas,
            model.anchor_generator,
            batch['boxes'],
            batch['classes'],
            batch['box_mask'],
            pad_shape(batch['image_size']),
        )
        return loss, model_state

    def eval_program(self, model, config):
        b = config.eval_batch_size
        height, width = self._canvas()
        batch = {
            'image': jax.ShapeDtypeStruct((b, height, width, 3), jnp.uint8),
            'image_size': jax.ShapeDtypeStruct((b, 2), jnp.int32),
            'scale_factor': jax.ShapeDtypeStruct((b, 4), jnp.float32),
            'image_id': jax.ShapeDtypeStruct((b,), jnp.int32),
            'mask': jax.ShapeDtypeStruct((b,), jnp.bool_),
        }
        evaluate = functools.partial(detect_step, model=model, data_config=self.data)
        return evaluate, (batch,), b, True

    def make_evaluator(self, model, mesh, variables_sharding, config):
        """Global batches of one orientation each; detections replicated to every host, which
        all score them (the same numbers everywhere, no further exchange)."""
        step = jax.jit(
            self.eval_program(model, config)[0],
            in_shardings=(variables_sharding, sharding_lib.batch_sharding(mesh)),
            out_shardings=sharding_lib.replicated(mesh),
            compiler_options=inference_compiler_options(),
        )
        split = coco.load_annotations(config.data.data_dir, config.data.eval_split, training=False)

        def batches():
            for batch in coco.create_eval_iterator(
                config.data,
                global_batch_size=config.eval_batch_size,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
            ):
                yield batch | {'image_id': batch['image_id'].astype(np.int32)}

        def evaluate(variables):
            found = [
                jax.device_get(step(variables, batch))
                for batch in sharding_lib.prefetch_to_device(batches(), mesh)
            ]
            if not found:
                raise ValueError('the validation split is empty')
            found = {k: np.concatenate([f[k] for f in found]) for k in found[0]}
            keep = found.pop('mask')
            found = {k: v[keep] for k, v in found.items()}
            metrics, summary = self.score(found, split)
            if jax.process_index() == 0:
                logging.info('COCO evaluation of %d images:\n%s', int(keep.sum()), summary)
            sums = {k: np.float64(v) for k, v in metrics.items()}
            return sums | {'count': np.int64(len(found['image_id']))}

        return evaluate

    def score(self, found: dict[str, np.ndarray], split) -> tuple[dict[str, float], str]:
        """(metrics, the COCO table) of the detections `found` of every evaluated image (numpy:
        image_id, boxes in original pixels, scores, classes, num_detections) against the split's
        annotations: box AP."""
        results = coco_evaluator.detections_to_coco(
            found['image_id'],
            found['boxes'],
            found['scores'],
            found['classes'],
            found['num_detections'],
            split.category_ids,
        )
        return coco_evaluator.coco_box_metrics(split.annotation_file, results)

    def pretrained_params(self, source, target):
        """A classifier checkpoint goes into the `backbone` (the FPN and head start fresh); a
        detection checkpoint with another number of classes keeps a fresh `retina_cls`."""
        del target
        return backbone_transfer(source, '/retina_cls/')

    @classmethod
    def preprocessing(cls, config):
        """Fit into image_scale keeping the aspect ratio (bilinear), mean/std of config (0..255)
        on the 0..1 scale of pretrained.Preprocessing; input_size = (short, long) limits."""
        data = config.data
        long_side, short_side = sorted(coco.coco_field(data, 'image_scale'), reverse=True)
        return pretrained.Preprocessing(
            input_size=(short_side, long_side),
            crop_pct=1.0,
            interpolation='bilinear',
            mean=tuple(m / 255.0 for m in data.mean),
            std=tuple(s / 255.0 for s in data.std),
        )

    def final_metrics(self, sums):
        return {k: float(sums[k]) for k in self.metric_names} | {'count': int(sums['count'])}

    @staticmethod
    def describe(metrics):
        """Percentages; 'n/a' where the evaluated images hold no object of that size."""

        def percent(name):
            value = metrics[name]
            return f'{100 * value:.2f}' if value >= 0 else 'n/a'

        scores = ' | '.join(
            f'{"box AP" if name == "AP" else name.replace("_", " ")} {percent(name)}'
            for name in metrics
            if name != 'count'
        )
        return f'{scores} | {metrics["count"]} images'
