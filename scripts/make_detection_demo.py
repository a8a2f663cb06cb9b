"""Writes a small object detection dataset in the COCO layout (no download needed).

Each image is a crop of one of scikit-learn's sample photographs (china.jpg, flower.jpg), blurred
and darkened into a textured canvas, with 1 to 4 bright shapes pasted where they do not touch:
five classes, each a shape in its own colour, of sides 24 to 64 pixels. Images are 128x128,
128x160 or 160x128 (height x width), so both orientations occur. Every object is annotated with
its box and its instance mask (a polygon):

    OUT/train2017/<image id>.jpg
    OUT/val2017/<image id>.jpg
    OUT/annotations/instances_{train2017,val2017}.json

The JSON holds 'images' (id, file_name, height, width), 'annotations' (id, image_id,
category_id, bbox [x, y, w, h] of the mask's pixels, area = the mask's pixel count, iscrowd 0,
segmentation [polygon]) and 'categories' with the non-contiguous ids 1, 2, 3, 5, 7.

Usage: python scripts/make_detection_demo.py [--out workdirs/detection_demo_data]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil

import numpy as np
from PIL import Image, ImageFilter
from pycocotools import mask as mask_utils

# (COCO id, name, RGB colour); the ids skip 4 and 6 so the contiguous ids differ from them.
CATEGORIES = (
    (1, 'square', (235, 60, 60)),
    (2, 'disk', (60, 225, 80)),
    (3, 'triangle', (70, 110, 245)),
    (5, 'cross', (240, 220, 60)),
    (7, 'star', (225, 80, 230)),
)
IMAGE_SIZES = ((128, 128), (128, 128), (128, 160), (160, 128))  # (height, width), drawn uniformly
SIDE_RANGE = (24, 64)  # object width and height, pixels
GAP = 4  # pixels between the boxes of one image
MAX_OBJECTS = 4


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    vertices = []
    for k in range(2 * points):
        radius = 0.5 if k % 2 == 0 else 0.5 * inner
        angle = math.pi * k / points - math.pi / 2
        vertices.append((0.5 + radius * math.cos(angle), 0.5 + radius * math.sin(angle)))
    return vertices


# Outlines in the unit square (x, y in [0, 1]), by category name.
SHAPES = {
    'square': [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)],
    'disk': [
        (0.5 + 0.5 * math.cos(2 * math.pi * k / 32), 0.5 + 0.5 * math.sin(2 * math.pi * k / 32))
        for k in range(32)
    ],
    'triangle': [(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)],
    # a plus sign of arms one third wide, its corners on a 3 x 3 grid
    'cross': [
        (x / 3, y / 3)
        for x, y in (
            (1, 0),
            (2, 0),
            (2, 1),
            (3, 1),
            (3, 2),
            (2, 2),
            (2, 3),
            (1, 3),
            (1, 2),
            (0, 2),
            (0, 1),
            (1, 1),
        )
    ],
    'star': _star(),
}


def _canvas(rng: np.random.RandomState, photos: list[np.ndarray], height: int, width: int):
    """A blurred, darkened crop of a sample photo, float32 (height, width, 3)."""
    photo = photos[rng.randint(len(photos))]
    scale = rng.uniform(1.0, 2.0)
    crop_h, crop_w = int(height * scale), int(width * scale)
    y, x = rng.randint(photo.shape[0] - crop_h), rng.randint(photo.shape[1] - crop_w)
    crop = Image.fromarray(photo[y : y + crop_h, x : x + crop_w])
    crop = crop.resize((width, height), Image.BILINEAR).filter(ImageFilter.GaussianBlur(1.0))
    return np.asarray(crop, np.float32) * rng.uniform(0.3, 0.5)


def _apart(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether boxes a and b (x1, y1, x2, y2) are at least GAP pixels apart on some axis."""
    return bool(
        a[0] >= b[2] + GAP or b[0] >= a[2] + GAP or a[1] >= b[3] + GAP or b[1] >= a[3] + GAP
    )


def _place_boxes(rng: np.random.RandomState, height: int, width: int) -> list[np.ndarray]:
    """1..MAX_OBJECTS boxes (x1, y1, x2, y2) at least GAP pixels apart, inside the image."""
    wanted = rng.randint(1, MAX_OBJECTS + 1)
    boxes: list[np.ndarray] = []
    for _ in range(50 * wanted):
        if len(boxes) == wanted:
            break
        w, h = rng.randint(SIDE_RANGE[0], SIDE_RANGE[1] + 1, size=2)
        x, y = rng.randint(0, width - w + 1), rng.randint(0, height - h + 1)
        box = np.array([x, y, x + w, y + h], np.float64)
        if all(_apart(box, other) for other in boxes):
            boxes.append(box)
    return boxes


def _draw_objects(rng: np.random.RandomState, image: np.ndarray) -> list[dict]:
    """Paints shapes on the image (in place); their annotations (without ids)."""
    height, width = image.shape[:2]
    annotations = []
    for box in _place_boxes(rng, height, width):
        category_id, name, colour = CATEGORIES[rng.randint(len(CATEGORIES))]
        outline = np.asarray(SHAPES[name]) * (box[2:] - box[:2]) + box[:2]
        polygon = [round(float(v), 2) for v in outline.reshape(-1)]
        rle = mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))
        pixels = mask_utils.decode(rle).astype(bool)
        shade = np.clip(np.asarray(colour) + rng.uniform(-15, 15, size=3), 0, 255)
        image[pixels] = shade
        annotations.append(
            {
                'category_id': category_id,
                'bbox': [float(v) for v in mask_utils.toBbox(rle)],
                'area': float(mask_utils.area(rle)),
                'iscrowd': 0,
                'segmentation': [polygon],
            }
        )
    return annotations


def write_detection_demo(
    out_dir: str, *, num_train: int = 1500, num_val: int = 200, seed: int = 0
) -> dict[str, tuple[int, int]]:
    """Writes the dataset (replacing an earlier copy only once complete); (images, objects) per
    split."""
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(p) for p in load_sample_images().images]
    rng = np.random.RandomState(seed)
    tmp_dir = out_dir.rstrip('/') + '.tmp'
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(os.path.join(tmp_dir, 'annotations'))
    categories = [{'id': i, 'name': name, 'supercategory': 'shape'} for i, name, _ in CATEGORIES]
    counts = {}
    for split, count in (('train2017', num_train), ('val2017', num_val)):
        os.makedirs(os.path.join(tmp_dir, split))
        images, annotations = [], []
        for image_id in range(1, count + 1):
            height, width = IMAGE_SIZES[rng.randint(len(IMAGE_SIZES))]
            image = _canvas(rng, photos, height, width)
            for annotation in _draw_objects(rng, image):
                annotations.append({'id': len(annotations) + 1, 'image_id': image_id, **annotation})
            name = f'{image_id:012d}.jpg'
            pixels = np.clip(np.round(image), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(tmp_dir, split, name), quality=95)
            images.append({'id': image_id, 'file_name': name, 'height': height, 'width': width})
        path = os.path.join(tmp_dir, 'annotations', f'instances_{split}.json')
        with open(path, 'w') as f:
            json.dump({'images': images, 'annotations': annotations, 'categories': categories}, f)
        counts[split] = (len(images), len(annotations))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.rename(tmp_dir, out_dir)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='workdirs/detection_demo_data', help='output folder')
    parser.add_argument('--train', type=int, default=1500, help='training images')
    parser.add_argument('--val', type=int, default=200, help='validation images')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    counts = write_detection_demo(args.out, num_train=args.train, num_val=args.val, seed=args.seed)
    print(
        f'Wrote {counts["train2017"][0]} training images ({counts["train2017"][1]} objects) and '
        f'{counts["val2017"][0]} validation images ({counts["val2017"][1]} objects) of '
        f'{len(CATEGORIES)} classes to {args.out}/{{train2017,val2017,annotations}}/'
    )


if __name__ == '__main__':
    main()
