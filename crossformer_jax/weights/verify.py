"""Verification of converted weights against the PyTorch reference models (needs torch).

`compare_with_torch` runs the reference (crossformer_jax.reference) holding a state dict and the
Flax model holding the converted variables on the same seeded random images, output by output.
For a detection model it also compares the detections each side's post-processing makes of its
own outputs (`compare_detections`); a (Cascade) Mask R-CNN is compared on its raw outputs: the
RPN's, and those of every box and mask head on the same seeded random RoIs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import torch

from crossformer_jax.detection.postprocess import detect
from crossformer_jax.models import create_model
from crossformer_jax.models.mask_rcnn import NUM_CASCADE_STAGES
from crossformer_jax.models.segmentation import FCNHead, resize_bilinear, segmentation_backbone
from crossformer_jax.reference.crossformer import create_torch_model
from crossformer_jax.reference.detection import create_torch_detection_model, detect_single
from crossformer_jax.reference.mask_rcnn import create_torch_mask_rcnn_model
from crossformer_jax.reference.segmentation import create_torch_segmentation_model
from crossformer_jax.weights.convert import (
    is_derived_buffer,
    is_detection_name,
    is_mask_rcnn_name,
    is_segmentation_name,
    to_numpy,
)
from crossformer_jax.weights.torch_io import strip_module_prefix

# Detection models: the head outputs must agree to this relative error (max|diff| / max|ref|),
# at these input sizes by default (two aspect ratios: every level's map changes shape).
DETECTION_TOLERANCE = 1e-5
DETECTION_IMAGE_SIZES = ((224, 320), (256, 256))
# The detections of the two post-processings must agree in number and classes, and their boxes
# and scores to this relative error.
DETECTIONS_TOLERANCE = 1e-4
# compare_detections shifts the class logits so that about this many (box, class) pairs per image
# score above the threshold.
CANDIDATES_PER_IMAGE = 300
# (Cascade) Mask R-CNN: the box and mask heads are compared on this many random RoIs per image.
ROIS_PER_IMAGE = 16

# -------------------------------------------------------------------------------------------------
# Verification against the PyTorch reference.


@dataclasses.dataclass
class Comparison:
    """One output of the reference and of the Flax model side by side.

    tolerance: the relative error this output must stay within, when it has its own (the
    detections); None: the caller's. mismatch: why the two cannot even be compared numerically
    (detections that differ in number or classes); such a comparison fails.
    """

    label: str
    shape: tuple[int, ...]
    max_abs_diff: float
    max_abs_reference: float
    tolerance: float | None = None
    mismatch: str | None = None

    @classmethod
    def of(cls, label: str, reference: np.ndarray, output: np.ndarray) -> Comparison:
        """The comparison of two arrays of the same shape (RuntimeError naming both otherwise)."""
        if reference.shape != output.shape:
            raise RuntimeError(
                f'{label}: reference shape {reference.shape} != Flax shape {output.shape}'
            )
        return cls(
            label,
            reference.shape,
            float(np.max(np.abs(reference - output), initial=0.0)),
            float(np.max(np.abs(reference), initial=0.0)),
        )

    @property
    def relative(self) -> float:
        """max|diff| / max|reference|."""
        return self.max_abs_diff / max(self.max_abs_reference, np.finfo(np.float32).tiny)

    def passes(self, tolerance: float) -> bool:
        """No mismatch and max|diff| <= tolerance * max|reference|, with the comparison's own
        tolerance if it has one, else `tolerance`."""
        if self.mismatch is not None:
            return False
        limit = self.tolerance if self.tolerance is not None else tolerance
        return self.max_abs_diff <= limit * self.max_abs_reference


def compare_with_torch(
    state_dict: Mapping[str, Any],
    variables: Mapping[str, Any],
    name: str,
    *,
    num_classes: int | None,
    features_only: bool,
    image_size: tuple[int, int] = (224, 224),
    batch_size: int = 1,
    seed: int = 0,
    **overrides,
) -> list[Comparison]:
    """Runs the PyTorch reference (holding `state_dict`, loaded strictly) and the Flax model
    (holding `variables`) on the same seeded random images; returns one Comparison per output
    (the logits, or the four backbone maps compared in NCHW; for segmentation models the logits
    at the input size and, with an auxiliary head, its logits too; for detection models every
    level's class logits and box deltas, then the detections, see `compare_detections`; for
    (Cascade) Mask R-CNN every level's objectness and RPN deltas, then each stage's class
    logits, box deltas and mask logits on `random_rois`)."""

    if is_segmentation_name(name):
        return _compare_segmentation_with_torch(
            state_dict, variables, name, num_classes, image_size, batch_size, seed, overrides
        )
    if is_mask_rcnn_name(name):
        return _compare_mask_rcnn_with_torch(
            state_dict, variables, name, num_classes, image_size, batch_size, seed, overrides
        )
    if is_detection_name(name):
        return _compare_detection_with_torch(
            state_dict, variables, name, num_classes, image_size, batch_size, seed, overrides
        )

    kwargs = dict(features_only=features_only, **overrides)
    if not features_only:
        kwargs['num_classes'] = num_classes
    torch_model = create_torch_model(name, **kwargs)
    torch_model.eval()
    # The derived buffers are the reference's own (they depend on the group size only); everything
    # else must come from the checkpoint, strictly.
    _load_torch_reference(torch_model, state_dict)

    height, width = image_size
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch_size, 3, height, width)).astype(np.float32)
    with torch.no_grad():
        reference = torch_model(torch.from_numpy(images))
    flax_model = create_model(name, **kwargs)
    outputs = jax.jit(lambda v, x: flax_model.apply(v, x))(variables, images.transpose(0, 2, 3, 1))

    if features_only:
        pairs = [
            (f'stage {s} map', r.numpy(), np.asarray(o).transpose(0, 3, 1, 2))
            for s, (r, o) in enumerate(zip(reference, outputs))
        ]
        if len(reference) != len(outputs):
            raise RuntimeError(f'reference gave {len(reference)} maps, Flax {len(outputs)}')
    else:
        pairs = [('logits', reference.numpy(), np.asarray(outputs))]
    return [Comparison.of(label, ref, out) for label, ref, out in pairs]


def _load_torch_reference(torch_model, state_dict: Mapping[str, Any]) -> None:
    """Loads `state_dict` strictly, the derived buffers (and BatchNorm step counters) excepted:
    those are the reference's own."""
    own = torch_model.state_dict()
    loaded = {}
    for k, v in state_dict.items():
        k = strip_module_prefix(k)
        if not is_derived_buffer(k):
            loaded[k] = v if isinstance(v, torch.Tensor) else torch.from_numpy(to_numpy(v))
    loaded.update({k: v for k, v in own.items() if is_derived_buffer(k)})
    torch_model.load_state_dict(loaded, strict=True)


def _compare_segmentation_with_torch(
    state_dict, variables, name, num_classes, image_size, batch_size, seed, overrides
) -> list[Comparison]:

    torch_model = create_torch_segmentation_model(name, num_classes, **overrides)
    _load_torch_reference(torch_model, state_dict)
    height, width = image_size
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch_size, 3, height, width)).astype(np.float32)
    with torch.no_grad():
        reference = {'logits': torch_model(torch.from_numpy(images)).numpy()}
        if hasattr(torch_model, 'auxiliary_head'):
            reference['auxiliary logits'] = torch_model.auxiliary(torch.from_numpy(images)).numpy()

    model = create_model(name, num_classes, **overrides)
    images_nhwc = images.transpose(0, 2, 3, 1)
    outputs = {'logits': jax.jit(model.apply)(variables, images_nhwc)}
    if 'auxiliary logits' in reference:
        backbone = segmentation_backbone(model)

        @jax.jit
        def auxiliary(variables, images):
            features = backbone.apply({'params': variables['params']['backbone']}, images)
            head = FCNHead(num_classes, model.aux_channels, model.dropout_rate)
            head_variables = {k: v['auxiliary_head'] for k, v in variables.items()}
            logits = head.apply(head_variables, features[2], False)
            return resize_bilinear(logits, images.shape[1:3])

        outputs['auxiliary logits'] = auxiliary(variables, images_nhwc)
    return [
        Comparison.of(label, ref, np.asarray(outputs[label]).transpose(0, 3, 1, 2))
        for label, ref in reference.items()
    ]


def _compare_detection_with_torch(
    state_dict, variables, name, num_classes, image_size, batch_size, seed, overrides
) -> list[Comparison]:
    torch_model = create_torch_detection_model(name, num_classes, **overrides)
    _load_torch_reference(torch_model, state_dict)
    height, width = image_size
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch_size, 3, height, width)).astype(np.float32)
    with torch.no_grad():
        reference = torch_model(torch.from_numpy(images))
    reference = tuple([x.numpy() for x in outputs] for outputs in reference)

    model = create_model(name, num_classes, **overrides)
    outputs = jax.jit(model.apply)(variables, images.transpose(0, 2, 3, 1))
    outputs = tuple([np.asarray(x).transpose(0, 3, 1, 2) for x in levels] for levels in outputs)
    comparisons = [
        Comparison.of(f'level {level} {what}', ref, out)
        for what, ref_levels, out_levels in zip(('class logits', 'box deltas'), reference, outputs)
        for level, (ref, out) in enumerate(zip(ref_levels, out_levels))
    ]
    return comparisons + compare_detections(
        reference, outputs, model.anchor_generator, (height, width)
    )


def random_rois(rng: np.random.Generator, batch: int, count: int, height: int, width: int):
    """(batch, count, 4) float32 xyxy RoIs inside a height x width image: sqrt(area) log-uniform
    from 4 pixels to the image's shorter side, so that they pool from every level the image's
    size reaches, aspect ratio log-uniform in [1/3, 3] (within the extent that
    detection.roi_align pools exactly), positions uniform."""
    limits = np.array([width, height], np.float64)
    scale = np.exp(rng.uniform(np.log(4.0), np.log(min(height, width)), size=(batch, count, 1)))
    aspect = np.exp(rng.uniform(-np.log(3.0), np.log(3.0), size=(batch, count, 1)))
    sides = np.minimum(
        np.concatenate([scale * np.sqrt(aspect), scale / np.sqrt(aspect)], -1), limits
    )
    corners = rng.uniform(0.0, 1.0, size=(batch, count, 2)) * (limits - sides)
    return np.concatenate([corners, corners + sides], axis=-1).astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)
def mask_rcnn_outputs(model, variables, images, rois):
    """MaskRCNN.__call__ with the module static: compiled once per configuration and input
    shapes (modules of equal fields compare equal), so that repeated checks reuse it."""
    return model.apply(variables, images, rois)


def _compare_mask_rcnn_with_torch(
    state_dict, variables, name, num_classes, image_size, batch_size, seed, overrides
) -> list[Comparison]:
    torch_model = create_torch_mask_rcnn_model(name, num_classes, **overrides)
    _load_torch_reference(torch_model, state_dict)
    height, width = image_size
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch_size, 3, height, width)).astype(np.float32)
    rois = random_rois(rng, batch_size, ROIS_PER_IMAGE, height, width)
    # MMDetection's RoI rows: (image index, x1, y1, x2, y2).
    image_index = np.repeat(np.arange(batch_size, dtype=np.float32), ROIS_PER_IMAGE)[:, None]
    torch_rois = torch.from_numpy(np.concatenate([image_index, rois.reshape(-1, 4)], axis=1))
    stages = range(NUM_CASCADE_STAGES if torch_model.roi_head.cascade else 1)
    suffixes = [f'.{s}' if torch_model.roi_head.cascade else '' for s in stages]

    reference = {}
    with torch.no_grad():
        levels = torch_model.features(torch.from_numpy(images))
        for what, outputs in zip(('objectness', 'rpn deltas'), torch_model.rpn(levels)):
            for level, x in enumerate(outputs):
                reference[f'level {level} {what}'] = x.numpy()
        for stage, suffix in zip(stages, suffixes):
            class_logits, box_deltas = torch_model.box_head(levels, torch_rois, stage)
            reference[f'roi_head.bbox_head{suffix} class logits'] = class_logits.numpy()
            reference[f'roi_head.bbox_head{suffix} box deltas'] = box_deltas.numpy()
            masks = torch_model.mask_head(levels, torch_rois, stage)
            reference[f'roi_head.mask_head{suffix} mask logits'] = masks.numpy()

    model = create_model(name, num_classes, **overrides)
    outputs = mask_rcnn_outputs(model, variables, images.transpose(0, 2, 3, 1), rois)
    outputs = jax.tree.map(np.asarray, outputs)
    found = {}
    for what, key in (('objectness', 'objectness'), ('rpn deltas', 'rpn_deltas')):
        for level, x in enumerate(outputs[key]):
            found[f'level {level} {what}'] = x.transpose(0, 3, 1, 2)
    rows = batch_size * ROIS_PER_IMAGE
    for stage, suffix in zip(stages, suffixes):
        found[f'roi_head.bbox_head{suffix} class logits'] = outputs['class_logits'][stage].reshape(
            rows, -1
        )
        found[f'roi_head.bbox_head{suffix} box deltas'] = outputs['box_deltas'][stage].reshape(
            rows, -1
        )
        masks = outputs['mask_logits'][stage]
        found[f'roi_head.mask_head{suffix} mask logits'] = masks.reshape(
            rows, *masks.shape[2:]
        ).transpose(0, 3, 1, 2)
    return [Comparison.of(label, ref, found[label]) for label, ref in reference.items()]


def detection_logit_shift(class_logits, score_threshold: float, candidates: int) -> float:
    """The constant that, added to every class logit, puts about `candidates` (logit, class)
    pairs above the score threshold: the threshold lands in the middle of the widest gap
    between consecutive logits ranked candidates / 2 .. 2 * candidates (so that float rounding
    cannot move a pair across it)."""
    ranked = np.sort(np.concatenate([np.ravel(x) for x in class_logits]))[::-1]
    low, high = max(candidates // 2, 1), min(2 * candidates, ranked.size - 1)
    if high < low:  # fewer pairs than wanted: all of them above the threshold
        cut = float(ranked[-1]) - 1.0
    else:
        gaps = ranked[low - 1 : high - 1] - ranked[low:high]
        at = low - 1 + int(np.argmax(gaps))
        cut = (float(ranked[at]) + float(ranked[at + 1])) / 2
    return float(np.log(score_threshold / (1 - score_threshold))) - cut


def compare_detections(
    reference, outputs, anchor_generator, image_shape: tuple[int, int], *, score_threshold=0.05
) -> list[Comparison]:
    """The detections of the reference post-processing (crossformer_jax.reference.detection,
    PyTorch) on the reference's head outputs against those of `detect` (JAX) on the Flax
    model's, every image of the batch with image_shape (h, w).

    reference and outputs: (class logits, box deltas), lists of per-level NCHW arrays. Real
    detectors score a random image low everywhere and freshly initialised ones near the prior
    (0.01), so too few pairs would pass the score threshold for a meaningful check: every class
    logit of both sides is first shifted by the same constant (what a shifted retina_cls bias
    gives; `detection_logit_shift`, from the reference's logits), so that about
    CANDIDATES_PER_IMAGE pairs per image pass. The detections must agree in number and classes,
    boxes and scores to DETECTIONS_TOLERANCE, each reference detection compared with the closest
    Flax detection of its class (`match_detections`: equal scores may come in either order).
    Meant for trained or randomised weights: a freshly initialised head's logits hardly vary, and
    float rounding then orders its near-equal scores, which NMS may act on differently.
    """
    batch = reference[0][0].shape[0]
    shift = detection_logit_shift(reference[0], score_threshold, CANDIDATES_PER_IMAGE * batch)
    expected = []
    for i in range(batch):
        found = detect_single(
            [torch.from_numpy(x[i] + np.float32(shift)) for x in reference[0]],
            [torch.from_numpy(x[i]) for x in reference[1]],
            image_shape,
            anchor_generator,
            score_threshold=score_threshold,
        )
        expected.append({k: v.numpy() for k, v in found.items()})
    nhwc = [[x.transpose(0, 2, 3, 1) for x in levels] for levels in outputs]
    found = jax.jit(
        lambda logits, deltas: detect(
            logits,
            deltas,
            anchor_generator,
            np.full((batch, 2), image_shape, np.int32),
            score_threshold=score_threshold,
        )
    )([x + np.float32(shift) for x in nhwc[0]], nhwc[1])
    found = jax.tree.map(np.asarray, found)

    label = f'detections (class logits shifted by {shift:+.3f})'
    mismatches, pairs = [], {'boxes': [], 'scores': []}
    for i, reference_detections in enumerate(expected):
        count = int(found['num_detections'][i])
        if count != len(reference_detections['scores']):
            mismatches.append(
                f'image {i}: {len(reference_detections["scores"])} reference detections, '
                f'{count} Flax detections'
            )
            continue
        ours = {k: found[k][i, :count] for k in ('boxes', 'scores', 'classes')}
        order = match_detections(reference_detections, ours)
        if order is None:
            mismatches.append(f'image {i}: the classes of the detections differ')
            continue
        for key in pairs:
            pairs[key].append((reference_detections[key], ours[key][order]))
    total = sum(len(d['scores']) for d in expected)
    if mismatches:
        return [
            Comparison(
                label, (total,), np.inf, 0.0, DETECTIONS_TOLERANCE, mismatch='; '.join(mismatches)
            )
        ]
    return [
        dataclasses.replace(
            Comparison.of(
                f'{label}: {key}',
                np.concatenate([r for r, _ in pairs[key]]),
                np.concatenate([o for _, o in pairs[key]]),
            ),
            tolerance=DETECTIONS_TOLERANCE,
        )
        for key in pairs
    ]


def match_detections(reference: Mapping[str, np.ndarray], found: Mapping[str, np.ndarray]):
    """For each reference detection, best first, the index of the closest unmatched detection of
    `found` with its class (closest: the largest of its score and box differences, each relative
    to the reference's largest value); None when the two do not hold the same classes as often.
    Both: boxes (D, 4), scores (D,), classes (D,)."""
    if sorted(reference['classes'].tolist()) != sorted(found['classes'].tolist()):
        return None
    score_scale = max(float(np.max(np.abs(reference['scores']), initial=0.0)), 1e-30)
    box_scale = max(float(np.max(np.abs(reference['boxes']), initial=0.0)), 1e-30)
    unmatched = np.ones(len(found['classes']), bool)
    order = []
    for box, score, cls in zip(reference['boxes'], reference['scores'], reference['classes']):
        distance = np.maximum(
            np.abs(found['scores'] - score) / score_scale,
            np.max(np.abs(found['boxes'] - box), axis=1) / box_scale,
        )
        distance[~unmatched | (found['classes'] != cls)] = np.inf
        best = int(np.argmin(distance))
        unmatched[best] = False
        order.append(best)
    return np.asarray(order, np.int64)
