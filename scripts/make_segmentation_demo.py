"""Writes a small semantic segmentation dataset in the ADE20K folder layout (no download needed).

Each image is a crop of one of scikit-learn's sample photographs (china.jpg, flower.jpg), blurred
and darkened into a textured canvas, with one of scikit-learn's handwritten digits (8x8,
upsampled to 5/8 to 7/8 of the image side) pasted at a random place and size in a random bright
colour. Every pixel is labelled with its digit or background:

    OUT/images/{training,validation}/<index>.jpg
    OUT/annotations/{training,validation}/<index>.png   # 1 = background, 2 + d = digit d

Annotations follow ADE20K's "reduce zero label" convention (0 would be ignored), so the trainer
sees 11 classes: 0 background, 1 + d digit d. Digits of the two splits are disjoint.

Usage: python scripts/make_segmentation_demo.py [--out workdirs/segmentation_demo_data]
"""

from __future__ import annotations

import argparse
import os
import shutil

import numpy as np
from PIL import Image, ImageFilter


def _canvas(rng: np.random.RandomState, photos: list[np.ndarray], size: int) -> np.ndarray:
    photo = photos[rng.randint(len(photos))]
    side = rng.randint(size, 2 * size)
    y, x = rng.randint(photo.shape[0] - side), rng.randint(photo.shape[1] - side)
    crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR)
    crop = crop.filter(ImageFilter.GaussianBlur(1.0))
    return (np.asarray(crop, np.float32) * rng.uniform(0.35, 0.6)).astype(np.float32)


def _paste_digit(
    rng: np.random.RandomState,
    image: np.ndarray,
    label: np.ndarray,
    digit_image: np.ndarray,
    digit: int,
    side_range: tuple[int, int],
) -> None:
    """Pastes the digit, side ~ U[side_range), at a random place; labels its ink."""
    size = image.shape[0]
    side = rng.randint(*side_range)
    y, x = rng.randint(size - side + 1), rng.randint(size - side + 1)
    ink = Image.fromarray(np.round(digit_image * (255 / 16)).astype(np.uint8))
    ink = np.asarray(ink.resize((side, side), Image.BICUBIC), np.float32) / 255.0
    alpha = np.clip((ink - 0.25) / 0.35, 0.0, 1.0)[..., None]
    colour = rng.uniform(170, 255, size=3).astype(np.float32)
    region = image[y : y + side, x : x + side]
    image[y : y + side, x : x + side] = alpha * colour + (1 - alpha) * region
    label[y : y + side, x : x + side][ink > 0.4] = 2 + digit


def write_segmentation_demo(
    out_dir: str,
    *,
    num_train: int = 2000,
    num_validation: int = 200,
    size: int = 64,
    seed: int = 0,
) -> dict[str, int]:
    """Writes the dataset (replacing an earlier copy only once complete); images per split."""
    from sklearn.datasets import load_digits, load_sample_images

    digits = load_digits()
    photos = [np.asarray(p) for p in load_sample_images().images]
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(digits.target))
    pools = {'validation': order[: len(order) // 5], 'training': order[len(order) // 5 :]}
    side_range = (size * 5 // 8, size * 7 // 8 + 1)
    tmp_dir = out_dir.rstrip('/') + '.tmp'
    shutil.rmtree(tmp_dir, ignore_errors=True)
    counts = {}
    for split, count in (('training', num_train), ('validation', num_validation)):
        os.makedirs(os.path.join(tmp_dir, 'images', split))
        os.makedirs(os.path.join(tmp_dir, 'annotations', split))
        for index in range(count):
            image = _canvas(rng, photos, size)
            label = np.ones((size, size), np.uint8)
            chosen = rng.choice(pools[split])
            _paste_digit(
                rng, image, label, digits.images[chosen], digits.target[chosen], side_range
            )
            name = f'{index:05d}'
            Image.fromarray(np.clip(np.round(image), 0, 255).astype(np.uint8)).save(
                os.path.join(tmp_dir, 'images', split, name + '.jpg'), quality=95
            )
            Image.fromarray(label).save(os.path.join(tmp_dir, 'annotations', split, name + '.png'))
        counts[split] = count
    shutil.rmtree(out_dir, ignore_errors=True)
    os.rename(tmp_dir, out_dir)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='workdirs/segmentation_demo_data', help='output folder')
    parser.add_argument('--num_train', type=int, default=2000)
    parser.add_argument('--num_validation', type=int, default=200)
    parser.add_argument('--size', type=int, default=64, help='side of the square images')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    counts = write_segmentation_demo(
        args.out,
        num_train=args.num_train,
        num_validation=args.num_validation,
        size=args.size,
        seed=args.seed,
    )
    print(
        f'Wrote {counts["training"]} training and {counts["validation"]} validation images '
        f'({args.size}x{args.size}, 11 classes) to {args.out}/{{images,annotations}}/'
    )


if __name__ == '__main__':
    main()
