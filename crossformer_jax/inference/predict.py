"""What a trained or converted model sees in images (command line: crossformer_jax.cli.predict).

The weights are a pretrained directory (convert_torch_weights.py, save_pretrained) or a train.py
workdir (its best checkpoint). Each image goes through the evaluation transform recorded with the
weights (resize the short side to size / crop_pct, centre crop, mean/std; see
pretrained.Preprocessing),
images are run in fixed-size batches, sharded over the devices, and the top-k classes are printed
with their probabilities, named by the labels stored with the weights (folder names of an image
folder, ImageNet-1K class names) or by class index when there are none.

Folders are searched recursively for image files (sorted). A missing or undecodable image gives
one line naming it on stderr; the others are still predicted, and the exit status is then 1.

Segmentation models (crossformer_jax.models.segmentation) instead write a colour-coded mask PNG per
image into --mask-dir (pixel value = class index, in a palette of class colours) and print the
share of each class; their input is the whole image, resized so its long side is the stored
input size and zero-padded to it.

Detection models (RetinaNet, crossformer_jax.models.detection) print the boxes scoring at least
--score-threshold (class, score, x1 y1 x2 y2 in the original image's pixels) and write a copy of
each image with those boxes and their labels drawn into --box-dir. Their input is prepared as the
COCO evaluation prepares it (crossformer_jax.data.coco) and run through the evaluation's own
program (tasks.detection.detect_step), so the boxes are the ones it scores. Their images are
batched per canvas (landscape, portrait), so the results of a mix may come in another order than
the images were given; each result names its image.

(Cascade) Mask R-CNN models (crossformer_jax.models.mask_rcnn) do the same through the instance
segmentation evaluation's program (tasks.instance_segmentation.segment_step, with the test-time
proposal counts of its TWO_STAGE_DEFAULTS), and also give each box's mask: pasted into the
original image at 0.5 as the COCO mask evaluation pastes it (evaluators.coco.paste_mask),
reported as COCO RLE with its area in pixels, and filled semi-transparently in the box's colour
on the drawn copy.

Each kind of model is one entry of `TASKS` (host-side preparation, device-side outputs, per-image
results), so a new kind of head is a new entry there.
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_util

from crossformer_jax.augment import batch_ops
from crossformer_jax.data import coco
from crossformer_jax.data import preprocess_ops as ops
from crossformer_jax.data.ade20k import resize_bilinear_uint8
from crossformer_jax.data.config import COCO_DEFAULTS
from crossformer_jax.evaluators.coco import paste_mask
from crossformer_jax.runtime import sharding
from crossformer_jax.runtime.compile_options import inference_compiler_options
from crossformer_jax.tasks.detection import detect_step
from crossformer_jax.tasks.instance_segmentation import TWO_STAGE_DEFAULTS, segment_step
from crossformer_jax.weights.pretrained import Preprocessing, PretrainedError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')


# -------------------------------------------------------------------------------------------------
# Inputs.


@dataclasses.dataclass(frozen=True)
class ImageError:
    """An input that could not be used; `message` says why."""

    path: str
    message: str


def list_images(inputs: Sequence[str]) -> list[str | ImageError]:
    """Files as given, folders expanded to their image files (recursive, sorted); a path that does
    not exist, or a folder without images, becomes an ImageError in its place."""
    found: list[str | ImageError] = []
    for path in inputs:
        if os.path.isdir(path):
            files = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(path)
                for name in names
                if name.lower().endswith(IMAGE_EXTENSIONS)
            )
            if not files:
                found.append(
                    ImageError(path, f'no image files ({", ".join(IMAGE_EXTENSIONS)}) in folder')
                )
            found.extend(files)
        elif os.path.isfile(path):
            found.append(path)
        else:
            found.append(ImageError(path, 'no such file or folder'))
    return found


def preprocess_image(path: str, preprocessing: Preprocessing) -> np.ndarray:
    """The image file at `path` as the model input (H, W, 3) float32; the same TF operations as
    the evaluation input pipeline. Raises ValueError when the file cannot be read or decoded."""

    height, width = preprocessing.input_size
    if height != width:
        raise ValueError(f'only square input sizes are supported, got {height}x{width}')
    short = math.floor(height / preprocessing.crop_pct + 1e-6)
    image = decode(path)
    image = ops.resize_short_side(image, short, method=preprocessing.interpolation)
    image = ops.center_crop(image, height)
    return np.asarray(batch_ops.normalize(image.numpy(), preprocessing.mean, preprocessing.std))


def decode(path: str):
    """The image file as a uint8 (H, W, 3) tensor; ValueError when it cannot be read/decoded."""

    try:
        return ops.decode_image(tf.io.read_file(path))
    except tf.errors.OpError as e:
        reason = re.sub(r'\{\{.*?\}\}|\[Op:.*', '', e.message or type(e).__name__).strip()
        raise ValueError(f'cannot decode image: {reason or type(e).__name__}') from None


# -------------------------------------------------------------------------------------------------
# Tasks: how each kind of model prepares an image and what its outputs mean for it.


@dataclasses.dataclass(frozen=True)
class Prediction:
    """Top classes of one image: (label, class index, probability), most probable first."""

    path: str
    top: list[tuple[str, int, float]]

    def to_json(self) -> dict[str, Any]:
        return {
            'image': self.path,
            'top': [{'label': lb, 'index': i, 'probability': p} for lb, i, p in self.top],
        }

    def to_text(self) -> str:
        lines = [self.path]
        lines += [f'  {p:7.2%}  {label}' for label, _, p in self.top]
        return '\n'.join(lines)


def classification_prepare(path: str, preprocessing: Preprocessing) -> tuple[np.ndarray, None]:
    return preprocess_image(path, preprocessing), None


def classification_outputs(model, variables, images, *, top_k: int, preprocessing: Preprocessing):
    """Device side of classification: (probabilities, indices), each (N, top_k)."""

    del preprocessing  # applied on the host
    logits = model.apply(variables, images, train=False)
    return jax.lax.top_k(jax.nn.softmax(logits, axis=-1), top_k)


def classification_results(outputs, paths, infos, label_names, options) -> list[Prediction]:
    del infos, options
    probabilities, indices = (np.asarray(x) for x in outputs)
    results = []
    for row, path in enumerate(paths):
        top = []
        for p, i in zip(probabilities[row], indices[row]):
            label = label_names[int(i)] if label_names is not None else str(int(i))
            top.append((label, int(i), float(p)))
        results.append(Prediction(path, top))
    return results


@dataclasses.dataclass(frozen=True)
class MaskPrediction:
    """A segmentation of one image: the mask PNG written and the share of pixels per class."""

    path: str
    mask_path: str
    classes: list[tuple[str, int, float]]  # (label, class index, fraction of pixels), largest first

    def to_json(self) -> dict[str, Any]:
        return {
            'image': self.path,
            'mask': self.mask_path,
            'classes': [{'label': lb, 'index': i, 'fraction': f} for lb, i, f in self.classes],
        }

    def to_text(self) -> str:
        lines = [f'{self.path} -> {self.mask_path}']
        lines += [f'  {f:7.2%}  {label}' for label, _, f in self.classes[:5]]
        return '\n'.join(lines)


def class_colours(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours, distinct per class: the bits of the class index spread
    over the high bits of R, G and B (class 0 black)."""
    colours = np.zeros((num_classes, 3), np.uint8)
    for k in range(num_classes):
        code, rgb = k, [0, 0, 0]
        for bit in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= (code & 1) << bit
                code >>= 1
        colours[k] = rgb
    return colours


def segmentation_prepare(path: str, preprocessing: Preprocessing):
    """The whole image, resized (aspect kept) so its long side is the input size, normalised and
    zero-padded at the bottom/right to input_size; info = (original H, W, resized H, W)."""

    size_h, size_w = preprocessing.input_size
    if size_h % 32 or size_w % 32:
        raise ValueError(f'the input size must be a multiple of 32, got {size_h}x{size_w}')
    image = decode(path)
    height, width = int(image.shape[0]), int(image.shape[1])
    scale = min(size_h / height, size_w / width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    image = ops.resize(image, (new_h, new_w), method=preprocessing.interpolation)
    image = np.asarray(batch_ops.normalize(image.numpy(), preprocessing.mean, preprocessing.std))
    padded = np.zeros((size_h, size_w, 3), np.float32)
    padded[:new_h, :new_w] = image
    return padded, (height, width, new_h, new_w)


def segmentation_outputs(model, variables, images, *, top_k: int, preprocessing: Preprocessing):
    """Device side of segmentation: the class of every pixel, (N, H, W) int32."""

    del top_k, preprocessing
    return jnp.argmax(model.apply(variables, images, train=False), axis=-1).astype(jnp.int32)


def _unique_path(directory: str, stem: str) -> str:
    path, n = os.path.join(directory, f'{stem}.png'), 1
    while os.path.exists(path):
        path, n = os.path.join(directory, f'{stem}_{n}.png'), n + 1
    return path


def segmentation_results(outputs, paths, infos, label_names, options) -> list[MaskPrediction]:
    """Writes MASK_DIR/<image name>.png per image (palette PNG: pixel value = class index, shown
    in its class colour), at the image's own size."""

    os.makedirs(options['mask_dir'], exist_ok=True)
    colours = class_colours(options['num_classes'])
    results = []
    for row, (path, (height, width, new_h, new_w)) in enumerate(zip(paths, infos)):
        classes = np.asarray(outputs[row])[:new_h, :new_w]
        mask = Image.fromarray(classes.astype(np.uint8 if len(colours) <= 256 else np.int32))
        mask = mask.resize((width, height), Image.NEAREST)
        if len(colours) <= 256:
            mask = mask.convert('P')
            mask.putpalette(colours.ravel().tolist())
        else:
            mask = Image.fromarray(colours[np.asarray(mask)])
        stem = os.path.splitext(os.path.basename(path))[0]
        mask_path = _unique_path(options['mask_dir'], stem)
        mask.save(mask_path)
        counts = np.bincount(classes.ravel(), minlength=len(colours))
        order = [int(k) for k in np.argsort(-counts, kind='stable') if counts[k]]
        share = [
            (label_names[k] if label_names is not None else str(k), k, counts[k] / classes.size)
            for k in order
        ]
        results.append(MaskPrediction(path, mask_path, share))
    return results


@dataclasses.dataclass(frozen=True)
class Detection:
    """One box: class name and index, score and x1, y1, x2, y2 in original pixels; for Mask
    R-CNN also its mask in the original image as COCO RLE ({'size': [H, W], 'counts': str}) and
    the mask's area in pixels."""

    label: str
    index: int
    score: float
    box: tuple[float, float, float, float]
    mask: dict[str, Any] | None = None
    area: int | None = None

    def to_json(self) -> dict[str, Any]:
        found = {
            'label': self.label,
            'index': self.index,
            'score': self.score,
            'box': list(self.box),
        }
        if self.mask is not None:
            found |= {'mask': self.mask, 'area': self.area}
        return found


@dataclasses.dataclass(frozen=True)
class DetectionPrediction:
    """The boxes found in one image, highest score first, and the copy of it with them drawn."""

    path: str
    drawn_path: str
    detections: list[Detection]

    def to_json(self) -> dict[str, Any]:
        return {
            'image': self.path,
            'drawn': self.drawn_path,
            'detections': [d.to_json() for d in self.detections],
        }

    def to_text(self) -> str:
        """The path line, then one line per box: score, x1 y1 x2 y2, for Mask R-CNN the mask's
        area ('<pixels> px'), and the label (last: it may hold spaces)."""
        lines = [f'{self.path} -> {self.drawn_path}']
        for d in self.detections:
            area = '' if d.area is None else f'  {d.area:7d} px'
            box = ' '.join(f'{v:7.1f}' for v in d.box)
            lines.append(f'  {d.score:5.3f}  {box}{area}  {d.label}')
        return '\n'.join(lines)


def detection_prepare(path: str, preprocessing: Preprocessing):
    """The image as the COCO evaluation loader prepares it (crossformer_jax.data.coco): decoded
    with PIL, resized (aspect kept, coco.resized_size) to fit the input_size = (short, long)
    limits, bilinearly as OpenCV does, and placed at the top left of a zero uint8 canvas of its
    orientation (coco.bucket_shapes; landscape when width >= height); normalised on the device
    by the evaluation's program. Model input {'image': (Hc, Wc, 3) uint8, 'image_size': (2,)
    int32 resized height and width, 'scale_factor': (4,) float32 from original to resized
    x1, y1, x2, y2 (coco.box_scale)}; info: the decoded original, uint8 (H, W, 3).

    Two canvases, landscape (the short and long limits rounded up to multiples of 32) and
    portrait (the same transposed), rather than one square canvas of the long limit: they are the
    evaluation's canvases, and the padding is seen by the backbone's attention groups and
    convolutions, so another canvas would give slightly different boxes from the ones evaluated;
    and they hold 40% fewer pixels than 1344 x 1344. The Predictor batches each canvas apart.
    """

    if preprocessing.interpolation != 'bilinear' or preprocessing.crop_pct != 1.0:
        raise ValueError(
            'detection models take whole images resized bilinearly (interpolation bilinear, '
            f'crop_pct 1.0); the weights say interpolation {preprocessing.interpolation}, '
            f'crop_pct {preprocessing.crop_pct}'
        )
    scale = (max(preprocessing.input_size), min(preprocessing.input_size))  # (long, short)
    try:
        image = coco.decode_rgb(path)
    except coco.CorruptImageError as e:
        raise ValueError(f'cannot decode image: {e}') from None
    height, width = image.shape[:2]
    new_h, new_w, _ = coco.resized_size(height, width, scale)
    landscape, portrait = coco.bucket_shapes(scale, COCO_DEFAULTS['size_divisor'])
    canvas = np.zeros((*(landscape if width >= height else portrait), 3), np.uint8)
    canvas[:new_h, :new_w] = resize_bilinear_uint8(image, new_h, new_w).numpy()
    model_input = {
        'image': canvas,
        'image_size': np.array([new_h, new_w], np.int32),
        'scale_factor': coco.box_scale(height, width, new_h, new_w),
    }
    return model_input, image


def evaluation_step(step: Callable[..., dict], model, variables, inputs, preprocessing, **settings):
    """`step` (an evaluation program: detect_step, segment_step) on detection_prepare's stacked
    inputs: the mean and std it normalises with are the weights' on its 0..255 scale, and the
    evaluation batch's bookkeeping (image_id, mask (N,)), which it passes through, is filled in
    and dropped from its outputs."""
    data_config = ml_collections.ConfigDict(
        {
            'mean': tuple(255.0 * m for m in preprocessing.mean),
            'std': tuple(255.0 * s for s in preprocessing.std),
        }
    )
    count = inputs['image'].shape[0]
    batch = inputs | {'image_id': jnp.zeros(count, jnp.int32), 'mask': jnp.ones(count, bool)}
    found = step(variables, batch, model=model, data_config=data_config, **settings)
    return {k: v for k, v in found.items() if k not in ('image_id', 'mask')}


def detection_outputs(model, variables, inputs, *, top_k: int, preprocessing: Preprocessing):
    """Device side of RetinaNet: detect_step's fixed-size outputs (boxes (N, D, 4) xyxy in
    original pixels, scores (N, D), classes (N, D), num_detections (N,))."""

    del top_k
    return evaluation_step(detect_step, model, variables, inputs, preprocessing)


def instance_outputs(model, variables, inputs, *, top_k: int, preprocessing: Preprocessing):
    """Device side of Mask R-CNN: segment_step with the test-time proposal counts of
    TWO_STAGE_DEFAULTS; detection_outputs' fields and masks (N, D, 28, 28), the probabilities of
    each detection's class over its box."""

    del top_k
    return evaluation_step(
        segment_step,
        model,
        variables,
        inputs,
        preprocessing,
        pre_nms_top_k=TWO_STAGE_DEFAULTS['test_pre_nms_top_k'],
        max_proposals=TWO_STAGE_DEFAULTS['test_proposals'],
    )


def box_colour(index: int) -> tuple[int, int, int]:
    """A bright RGB colour per class: hues a golden-ratio turn apart, so that neighbouring class
    indices look different."""
    red, green, blue = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.9, 1.0)
    return round(255 * red), round(255 * green), round(255 * blue)


MASK_OPACITY = 0.5  # a drawn mask's pixels: (1 - opacity) * image + opacity * class colour


def fill_masks(image: np.ndarray, detections: Sequence[Detection]) -> np.ndarray:
    """The uint8 (H, W, 3) image with each detection's mask (those that have one) blended with
    its class colour at MASK_OPACITY, the lowest score first (the highest ends on top)."""
    pixels = image.astype(np.float32)
    for detection in reversed(detections):
        if detection.mask is not None:
            inside = mask_util.decode(detection.mask).astype(bool)
            colour = np.float32(box_colour(detection.index))
            pixels[inside] += MASK_OPACITY * (colour - pixels[inside])
    return np.round(pixels).astype(np.uint8)


def draw_detections(image: np.ndarray, detections: Sequence[Detection]) -> Image.Image:
    """A copy of the uint8 (H, W, 3) image with the masks filled (fill_masks), then each box
    outlined in its class colour and a '<label> <score>' tag of that colour on its top-left
    corner (above the box where there is room; white text on dark tags, black on light ones);
    the highest score is drawn last, on top."""
    drawn = Image.fromarray(fill_masks(image, detections))
    draw = ImageDraw.Draw(drawn)
    height, width = image.shape[:2]
    line_width = max(1, round(min(height, width) / 300))
    font = ImageFont.load_default(size=max(10, round(min(height, width) / 40)))
    for detection in reversed(detections):
        colour = box_colour(detection.index)
        x1, y1, _, _ = detection.box
        draw.rectangle(detection.box, outline=colour, width=line_width)
        text = f'{detection.label} {detection.score:.2f}'
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tag_w, tag_h = right - left + 4, bottom - top + 4  # 2 pixels of margin all round
        tag_y = y1 - tag_h if y1 >= tag_h else y1
        draw.rectangle((x1, tag_y, x1 + tag_w, tag_y + tag_h), fill=colour)
        red, green, blue = colour
        dark = 0.299 * red + 0.587 * green + 0.114 * blue < 128  # luma of the tag
        ink = (255, 255, 255) if dark else (0, 0, 0)
        draw.text((x1 + 2 - left, tag_y + 2 - top), text, fill=ink, font=font)
    return drawn


def detection_results(outputs, paths, infos, label_names, options) -> list[DetectionPrediction]:
    """Keeps the boxes scoring at least options['score_threshold'] (in original pixels already:
    divided by each axis' resize ratio, so within the image up to float rounding, which a clip
    removes) and writes BOX_DIR/<image name>.png, the image with them drawn, at its own size.

    With Mask R-CNN's 'masks' (N, D, 28, 28) each kept box's mask is pasted into the original
    image exactly as the COCO mask evaluation pastes it (paste_mask at 0.5, with the box before
    the clip) and RLE-encoded (pycocotools)."""

    os.makedirs(options['box_dir'], exist_ok=True)
    results = []
    for row, (path, image) in enumerate(zip(paths, infos)):
        count = int(outputs['num_detections'][row])
        height, width = image.shape[:2]
        boxes = np.asarray(outputs['boxes'][row, :count])
        clipped = np.clip(boxes, 0.0, np.float32([width, height, width, height]))
        scores = np.asarray(outputs['scores'][row, :count])
        classes = np.asarray(outputs['classes'][row, :count])
        detections = []
        for i in np.argsort(-scores, kind='stable'):
            if scores[i] < options['score_threshold']:
                continue
            index = int(classes[i])
            mask = area = None
            if 'masks' in outputs:
                pasted = paste_mask(outputs['masks'][row, i], boxes[i], height, width)
                rle = mask_util.encode(np.asfortranarray(pasted.astype(np.uint8)))
                mask = {'size': [height, width], 'counts': rle['counts'].decode('ascii')}
                area = int(mask_util.area(rle))
            detections.append(
                Detection(
                    label_names[index] if label_names is not None else str(index),
                    index,
                    float(scores[i]),
                    tuple(float(v) for v in clipped[i]),
                    mask,
                    area,
                )
            )
        stem = os.path.splitext(os.path.basename(path))[0]
        drawn_path = _unique_path(options['box_dir'], stem)
        draw_detections(image, detections).save(drawn_path)
        results.append(DetectionPrediction(path, drawn_path, detections))
    return results


@dataclasses.dataclass(frozen=True)
class Task:
    """prepare(path, preprocessing) -> (model input, per-image info) on the host, the input an
    image (H, W, 3) or a dict of arrays; outputs(model, variables, inputs stacked to (N, ...),
    top_k=, preprocessing=) on the device (jit-compiled); results(outputs, paths, infos,
    label_names, options) -> one result per image."""

    prepare: Callable[..., tuple[Any, Any]]
    outputs: Callable[..., Any]
    results: Callable[..., list[Any]]


TASKS = {
    'classification': Task(classification_prepare, classification_outputs, classification_results),
    'segmentation': Task(segmentation_prepare, segmentation_outputs, segmentation_results),
    'detection': Task(detection_prepare, detection_outputs, detection_results),
    'instance_segmentation': Task(detection_prepare, instance_outputs, detection_results),
}


# -------------------------------------------------------------------------------------------------
# Running.


class Predictor:
    """A loaded model, its jit-compiled forward pass and its preprocessing.

    mask_dir: where segmentation models write their mask PNGs. box_dir: where detection and
    Mask R-CNN models write the images with their boxes (and masks) drawn; score_threshold: the
    least score of a box they report (their post-processing already drops boxes under 0.05).
    """

    def __init__(
        self,
        weights,
        *,
        batch_size: int = 32,
        top_k: int = 5,
        mask_dir: str = 'masks',
        box_dir: str = 'detections',
        score_threshold: float = 0.3,
    ):
        if weights.task not in TASKS:
            raise PretrainedError(
                f'{weights.source} holds a {weights.task} model, which has no predictions to '
                f'print (supported: {", ".join(TASKS)})'
            )
        num_classes = getattr(weights.model, 'num_classes', 0)
        if num_classes == 0:
            raise PretrainedError(f'{weights.source} has no classification head (num_classes 0)')
        if not 0 <= score_threshold <= 1:
            raise ValueError(f'score_threshold must be in [0, 1], got {score_threshold}')
        self.weights = weights
        self.task = TASKS[weights.task]
        self.options = {
            'mask_dir': mask_dir,
            'num_classes': num_classes,
            'box_dir': box_dir,
            'score_threshold': score_threshold,
        }
        self.mesh = sharding.create_mesh()
        devices = self.mesh.size
        self.batch_size = -(-batch_size // devices) * devices  # whole rows per device
        self.variables = jax.device_put(weights.variables, sharding.replicated(self.mesh))
        outputs = functools.partial(
            self.task.outputs,
            weights.model,
            top_k=min(top_k, num_classes),
            preprocessing=weights.preprocessing,
        )
        self.forward = jax.jit(
            outputs,
            in_shardings=(sharding.replicated(self.mesh), sharding.batch_sharding(self.mesh)),
            out_shardings=sharding.replicated(self.mesh),
            compiler_options=inference_compiler_options(),
        )

    def _stack(self, inputs: list[Any]) -> Any:
        """The model inputs of a batch stacked along a new leading axis, padded to batch_size rows
        (one compiled shape for every batch) with copies of the first: valid inputs, so the
        padding rows compute nothing degenerate (a zero image size or scale factor)."""
        inputs = inputs + inputs[:1] * (self.batch_size - len(inputs))
        return jax.tree.map(lambda *rows: np.stack(rows), *inputs)

    def _batches(self, inputs: Sequence[str | ImageError]):
        """(paths, infos, stacked model inputs or None, errors met since the previous batch).

        Inputs of different shapes (detection's two canvases) go into separate batches: each
        shape's batch is run when it is full, and the partly filled ones at the end, so results
        may come in another order than the images were given.
        """
        pending: dict[Any, tuple[list[str], list[Any], list[Any]]] = {}
        errors = []
        for item in inputs:
            if isinstance(item, ImageError):
                errors.append(item)
                continue
            try:
                model_input, info = self.task.prepare(item, self.weights.preprocessing)
            except (ValueError, OSError) as e:
                errors.append(ImageError(item, str(e)))
                continue
            shape = tuple(np.shape(x) for x in jax.tree.leaves(model_input))
            paths, infos, batch = pending.setdefault(shape, ([], [], []))
            paths.append(item)
            infos.append(info)
            batch.append(model_input)
            if len(batch) == self.batch_size:
                del pending[shape]
                yield paths, infos, self._stack(batch), errors
                errors = []
        for paths, infos, batch in pending.values():
            yield paths, infos, self._stack(batch), errors
            errors = []
        if errors:
            yield [], [], None, errors

    def run(self, inputs: Sequence[str | ImageError]) -> Iterator[Any]:
        """Yields, batch by batch, an ImageError per unusable input and then a result per image."""
        for paths, infos, batch, errors in self._batches(inputs):
            yield from errors
            if batch is None:
                continue
            batch = jax.device_put(batch, sharding.batch_sharding(self.mesh))
            outputs = jax.device_get(self.forward(self.variables, batch))
            yield from self.task.results(
                outputs, paths, infos, self.weights.label_names, self.options
            )
