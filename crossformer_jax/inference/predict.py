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

Each kind of model is one entry of `TASKS` (host-side preparation, device-side outputs, per-image
results), so a new kind of head is a new entry there.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from PIL import Image

from crossformer_jax.augment import batch_ops
from crossformer_jax.data import preprocess_ops as ops
from crossformer_jax.runtime import sharding
from crossformer_jax.runtime.compile_options import inference_compiler_options
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


def classification_outputs(model, variables, images, *, top_k: int):
    """Device side of classification: (probabilities, indices), each (N, top_k)."""

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


def segmentation_outputs(model, variables, images, *, top_k: int):
    """Device side of segmentation: the class of every pixel, (N, H, W) int32."""

    del top_k
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
class Task:
    """prepare(path, preprocessing) -> (model input (H, W, 3), per-image info) on the host;
    outputs(model, variables, images (N, H, W, 3), top_k=) on the device (jit-compiled);
    results(outputs, paths, infos, label_names, options) -> one result per image."""

    prepare: Callable[..., tuple[np.ndarray, Any]]
    outputs: Callable[..., Any]
    results: Callable[..., list[Any]]


TASKS = {
    'classification': Task(classification_prepare, classification_outputs, classification_results),
    'segmentation': Task(segmentation_prepare, segmentation_outputs, segmentation_results),
}


# -------------------------------------------------------------------------------------------------
# Running.


class Predictor:
    """A loaded model, its jit-compiled forward pass and its preprocessing.

    mask_dir: where segmentation models write their mask PNGs.
    """

    def __init__(self, weights, *, batch_size: int = 32, top_k: int = 5, mask_dir: str = 'masks'):
        if weights.task not in TASKS:
            raise PretrainedError(
                f'{weights.source} holds a {weights.task} model, which has no predictions to '
                f'print (supported: {", ".join(TASKS)})'
            )
        num_classes = getattr(weights.model, 'num_classes', 0)
        if num_classes == 0:
            raise PretrainedError(f'{weights.source} has no classification head (num_classes 0)')
        self.weights = weights
        self.task = TASKS[weights.task]
        self.options = {'mask_dir': mask_dir, 'num_classes': num_classes}
        self.mesh = sharding.create_mesh()
        devices = self.mesh.size
        self.batch_size = -(-batch_size // devices) * devices  # whole rows per device
        self.variables = jax.device_put(weights.variables, sharding.replicated(self.mesh))
        self.forward = jax.jit(
            functools.partial(self.task.outputs, weights.model, top_k=min(top_k, num_classes)),
            in_shardings=(sharding.replicated(self.mesh), sharding.batch_sharding(self.mesh)),
            out_shardings=sharding.replicated(self.mesh),
            compiler_options=inference_compiler_options(),
        )

    def _batches(self, inputs: Sequence[str | ImageError]):
        """(paths, infos, images padded to batch_size or None, errors met filling the batch)."""
        paths, infos, images, errors = [], [], [], []
        for item in inputs:
            if isinstance(item, ImageError):
                errors.append(item)
                continue
            try:
                image, info = self.task.prepare(item, self.weights.preprocessing)
            except (ValueError, OSError) as e:
                errors.append(ImageError(item, str(e)))
            else:
                images.append(image)
                infos.append(info)
                paths.append(item)
            if len(images) == self.batch_size:
                yield paths, infos, np.stack(images), errors
                paths, infos, images, errors = [], [], [], []
        if images:
            pad = self.batch_size - len(images)
            images += [np.zeros_like(images[0])] * pad  # one compiled shape for every batch
            yield paths, infos, np.stack(images), errors
        elif errors:
            yield [], [], None, errors

    def run(self, inputs: Sequence[str | ImageError]) -> Iterator[Any]:
        """Yields, batch by batch, an ImageError per unusable input and then a result per image."""
        for paths, infos, images, errors in self._batches(inputs):
            yield from errors
            if images is None:
                continue
            batch = jax.device_put(images, sharding.batch_sharding(self.mesh))
            outputs = jax.device_get(self.forward(self.variables, batch))
            yield from self.task.results(
                outputs, paths, infos, self.weights.label_names, self.options
            )
