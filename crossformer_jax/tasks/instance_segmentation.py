"""Instance segmentation on COCO: Mask R-CNN (MMDetection 2.x's 1x recipe), box and mask AP.

The data, canvases, normalisation, checkpoint transfer and evaluation loop are detection's
(crossformer_jax.tasks.detection); training batches also carry each ground truth's mask cropped
to its box (`masks` (B, M, S, S), config.data.masks). One train step:

1. RPN: anchors assigned (IoU >= 0.7 / < 0.3, low-quality matches from 0.3, anchors inside the
   image), 256 sampled per image (half positive at most), binary cross-entropy and L1;
2. proposals from the RPN's outputs (2000 per level, NMS 0.7 per level, 1000 kept; no gradient);
3. R-CNN: the ground truths join the proposals, 512 RoIs sampled per image (a quarter positive at
   most, IoU >= 0.5), 81-way softmax cross-entropy and L1 on the class's deltas (stds 0.1, 0.2);
4. masks: the positive RoIs (the first 128 sampled slots hold them) through the mask head, binary
   cross-entropy of their class's 28 x 28 logits against the ground truth resampled onto them.

Cascade Mask R-CNN repeats steps 3 and 4 for its three stages (RCNN_STAGES: IoU 0.5 / 0.6 /
0.7, loss weights 1 / 0.5 / 0.25; boxes.CASCADE_BOX_STDS), each stage's proposals being the
previous stage's sampled RoIs without the ground truths it added, moved by their class's deltas
(postprocess.regress_by_class); its box heads' BatchNorm statistics are the train state's
model_state. config.two_stage.rcnn_box_loss 'giou' regresses decoded boxes (Swin's cascade).

Evaluation: proposals (1000 per level, 1000 kept), the box head, `rcnn_detect` (score > 0.05,
NMS 0.5, 100 per image), the mask head on the detected boxes, each detection's class mask as
probabilities (B, 100, 28, 28); the host pastes them into the original image at 0.5.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from crossformer_jax.data import coco
from crossformer_jax.detection import mask_targets, postprocess, proposals, two_stage_losses
from crossformer_jax.detection.boxes import CASCADE_BOX_STDS
from crossformer_jax.evaluators import coco as coco_evaluator
from crossformer_jax.models import mask_rcnn
from crossformer_jax.tasks.base import backbone_transfer, model_overrides
from crossformer_jax.tasks.detection import DetectionTask, normalize_canvas

# MMDetection 2.x Mask R-CNN's proposal counts and R-CNN sampling (config.two_stage overrides).
TWO_STAGE_DEFAULTS = dict(
    train_pre_nms_top_k=2000,  # RPN boxes per level before NMS, training
    train_proposals=1000,  # proposals kept per image, training
    test_pre_nms_top_k=1000,
    test_proposals=1000,
    rcnn_samples=512,  # RoIs sampled per image for the R-CNN heads (each stage)
    rcnn_box_loss='l1',  # or 'giou' (Swin Transformer's cascade heads): see rcnn_loss
)
RPN_NMS_IOU = 0.7
RCNN_POSITIVE_FRACTION = 0.25
# Each R-CNN stage's (positive IoU threshold, loss weight): Mask R-CNN has the first only.
RCNN_STAGES = ((0.5, 1.0), (0.6, 0.5), (0.7, 0.25))
MASK_SIZE = 2 * mask_rcnn.MASK_ROI_SIZE  # the mask head's 28 x 28 outputs


def segment_step(
    variables, batch, *, model, data_config, pre_nms_top_k: int, max_proposals: int
) -> dict[str, jax.Array]:
    """Detections and their mask probabilities (B, 100, 28, 28) of an evaluation batch, boxes in
    original image pixels, with the batch's 'image_id' and 'mask' passed through. A cascade
    refines the proposals stage by stage (each RoI by its best class), averages the stages'
    class logits, decodes the last stage's deltas and averages the stages' mask probabilities."""
    images = normalize_canvas(
        batch['image'], batch['image_size'], data_config.mean, data_config.std
    )
    levels = model.apply(variables, images, method='features')
    objectness, deltas = model.apply(variables, levels, method='rpn')
    rois, _, valid = proposals.generate_proposals(
        objectness,
        deltas,
        model.rpn_anchor_generator,
        batch['image_size'],
        pre_nms_top_k=pre_nms_top_k,
        iou_threshold=RPN_NMS_IOU,
        max_proposals=max_proposals,
    )
    stages = range(model.num_stages)
    logits_sum = 0.0
    for stage in stages:
        class_logits, box_deltas = model.apply(variables, levels, rois, stage, method='box_head')
        logits_sum = logits_sum + class_logits
        if stage + 1 < model.num_stages:
            labels = jnp.argmax(class_logits[..., :-1], axis=-1)
            rois = postprocess.regress_by_class(
                rois, box_deltas, labels, batch['image_size'], CASCADE_BOX_STDS[stage]
            )
    found = postprocess.rcnn_detect(
        logits_sum / model.num_stages,
        box_deltas,
        rois,
        valid,
        batch['image_size'],
        box_stds=CASCADE_BOX_STDS[model.num_stages - 1],
    )
    classes = jnp.maximum(found['classes'], 0)[:, :, None, None, None]
    probabilities = [
        jax.nn.sigmoid(model.apply(variables, levels, found['boxes'], stage, method='mask_head'))
        for stage in stages
    ]
    masks = sum(probabilities) / model.num_stages
    found['masks'] = jnp.take_along_axis(masks, classes, axis=-1)[..., 0]
    found['boxes'] = found['boxes'] / batch['scale_factor'][:, None, :]
    return found | {'image_id': batch['image_id'], 'mask': batch['mask']}


@dataclasses.dataclass(frozen=True)
class InstanceSegmentationTask(DetectionTask):
    """Mask R-CNN on COCO (config.data.masks on); the best checkpoint by box AP.
    two_stage: TWO_STAGE_DEFAULTS with config.two_stage's changes."""

    two_stage: tuple[tuple[str, int], ...] = tuple(TWO_STAGE_DEFAULTS.items())

    name: ClassVar[str] = 'instance_segmentation'
    metric_names: ClassVar[tuple[str, ...]] = coco_evaluator.METRIC_NAMES + tuple(
        f'mask_{name}' for name in coco_evaluator.METRIC_NAMES
    )

    @classmethod
    def check_model(cls, config: ml_collections.ConfigDict) -> None:
        mask_rcnn.mask_rcnn_config(config.model.name, **model_overrides(config))
        if not coco.coco_field(config.data, 'masks'):
            raise ValueError('config.data.masks must be True: Mask R-CNN trains on the masks')

    @classmethod
    def from_config(cls, config, num_classes):
        changes = dict(config.get('two_stage', {}))
        unknown = sorted(set(changes) - set(TWO_STAGE_DEFAULTS))
        if unknown:
            raise ValueError(
                f'unknown config.two_stage field(s) {unknown}; known: {sorted(TWO_STAGE_DEFAULTS)}'
            )
        settings = {**TWO_STAGE_DEFAULTS, **changes}
        for name, value in settings.items():
            if name == 'rcnn_box_loss':
                if value not in two_stage_losses.BOX_LOSSES:
                    raise ValueError(
                        f'config.two_stage.rcnn_box_loss must be one of '
                        f'{two_stage_losses.BOX_LOSSES}, got {value!r}'
                    )
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f'config.two_stage.{name} must be a positive integer, got {value!r}'
                )
        two_stage = tuple(settings.items())
        return cls(num_classes=num_classes, data=config.data, two_stage=two_stage)

    def setting(self, name: str) -> int | str:
        """One of the two_stage settings."""
        return dict(self.two_stage)[name]

    def train_batch_spec(self, config, batch_size):
        size = coco.coco_field(config.data, 'mask_size')
        max_boxes = coco.coco_field(config.data, 'max_boxes')
        return super().train_batch_spec(config, batch_size) | {
            'masks': jax.ShapeDtypeStruct((batch_size, max_boxes, size, size), jnp.uint8)
        }

    def loss(self, model, params, model_state, batch, rng):
        variables = {'params': params, **model_state}
        path_rng, rpn_rng, *stage_rngs = jax.random.split(rng, 2 + model.num_stages)
        sizes, gt_boxes, gt_valid = batch['image_size'], batch['boxes'], batch['box_mask']
        levels = model.apply(
            variables, batch['image'], True, method='features', rngs={'dropout': path_rng}
        )
        objectness, deltas = model.apply(variables, levels, method='rpn')
        total, _ = two_stage_losses.rpn_loss(
            objectness, deltas, model.rpn_anchor_generator, gt_boxes, gt_valid, sizes, rpn_rng
        )
        rois, _, valid = proposals.generate_proposals(
            jax.lax.stop_gradient(objectness),
            jax.lax.stop_gradient(deltas),
            model.rpn_anchor_generator,
            sizes,
            pre_nms_top_k=self.setting('train_pre_nms_top_k'),
            iou_threshold=RPN_NMS_IOU,
            max_proposals=self.setting('train_proposals'),
        )
        num_samples = self.setting('rcnn_samples')
        # The sampler puts the positives (at most a quarter) in the first slots.
        most_positives = int(num_samples * RCNN_POSITIVE_FRACTION)
        for stage in range(model.num_stages):
            iou_threshold, weight = RCNN_STAGES[stage]
            box_stds = CASCADE_BOX_STDS[stage]
            targets = two_stage_losses.rcnn_targets(
                rois,
                valid,
                gt_boxes,
                batch['classes'],
                gt_valid,
                stage_rngs[stage],
                num_classes=model.num_classes,
                num_samples=num_samples,
                pos_fraction=RCNN_POSITIVE_FRACTION,
                iou_threshold=iou_threshold,
                box_stds=box_stds,
            )
            # BatchNorm in the cascade's box heads: batch statistics, running ones updated.
            (class_logits, box_deltas), updates = model.apply(
                variables,
                levels,
                targets['rois'],
                stage,
                True,
                method='box_head',
                mutable=['batch_stats'],
            )
            variables = {**variables, **updates}
            box_loss, _ = two_stage_losses.rcnn_loss(
                class_logits,
                box_deltas,
                targets,
                box_loss=self.setting('rcnn_box_loss'),
                box_stds=box_stds,
            )
            positives = {k: v[:, :most_positives] for k, v in targets.items()}
            mask_logits = model.apply(
                variables, levels, positives['rois'], stage, method='mask_head'
            )
            truth = mask_targets.mask_targets(
                batch['masks'], gt_boxes, positives['rois'], positives['matched_gt'], size=MASK_SIZE
            )
            mask_loss = two_stage_losses.mask_loss(
                mask_logits, truth, positives['labels'], positives['is_positive']
            )
            total = total + weight * (box_loss + mask_loss)
            if stage + 1 < model.num_stages:
                # The next stage's proposals: this stage's sampled RoIs but the ground truths,
                # moved by their class's deltas (the background ones by their best class's).
                class_logits, box_deltas = jax.lax.stop_gradient((class_logits, box_deltas))
                labels = jnp.where(
                    targets['labels'] == model.num_classes,
                    jnp.argmax(class_logits[..., :-1], axis=-1),
                    targets['labels'],
                )
                rois = postprocess.regress_by_class(
                    targets['rois'], box_deltas, labels, sizes, box_stds
                )
                valid = targets['valid'] & (targets['indices'] >= gt_boxes.shape[1])
        return total, {k: v for k, v in variables.items() if k != 'params'}

    def eval_program(self, model, config):
        evaluate, inputs, images, batched = super().eval_program(model, config)
        del evaluate
        return (
            functools.partial(
                segment_step,
                model=model,
                data_config=self.data,
                pre_nms_top_k=self.setting('test_pre_nms_top_k'),
                max_proposals=self.setting('test_proposals'),
            ),
            inputs,
            images,
            batched,
        )

    def score(self, found, split):
        """Box AP and mask AP (the 28 x 28 probabilities pasted into each original image)."""
        box_metrics, box_summary = super().score(found, split)
        heights_widths = {image.image_id: (image.height, image.width) for image in split.images}
        results = coco_evaluator.masks_to_coco(
            found['image_id'],
            found['boxes'],
            found['masks'],
            found['scores'],
            found['classes'],
            found['num_detections'],
            split.category_ids,
            np.asarray([heights_widths[int(i)] for i in found['image_id']], np.int64),
        )
        mask_metrics, mask_summary = coco_evaluator.coco_metrics(
            split.annotation_file, results, iou_type='segm'
        )
        metrics = box_metrics | {f'mask_{k}': v for k, v in mask_metrics.items()}
        return metrics, f'boxes:\n{box_summary}\nmasks:\n{mask_summary}'

    def pretrained_params(self, source, target):
        """A classifier checkpoint goes into the `backbone` (FPN, RPN and RoI heads start
        fresh); a Mask R-CNN checkpoint with another number of classes keeps fresh class layers
        (fc_cls, fc_reg, conv_logits)."""
        del target
        source, may_start_fresh = backbone_transfer(source, '/fc_cls/')

        def fresh(path: str, loaded) -> bool:
            resized = loaded is not None and ('/fc_reg/' in path or '/conv_logits/' in path)
            return may_start_fresh(path, loaded) or resized

        return source, fresh
