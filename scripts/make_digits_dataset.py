"""Writes scikit-learn's handwritten digits as a small image-folder dataset (no download needed).

The 1797 8x8 grey-level digits that ship inside scikit-learn are upsampled (bicubic) to RGB PNGs
and split per class, deterministically, into about 80% training and 20% validation images:

    OUT/train/<digit>/<index>.png
    OUT/validation/<digit>/<index>.png

Usage: python scripts/make_digits_dataset.py [--out workdirs/digits_data] [--size 32]
"""

from __future__ import annotations

import argparse
import os
import shutil

import numpy as np
from PIL import Image


def write_digits(
    out_dir: str, *, size: int = 32, validation_fraction: float = 0.2, seed: int = 0
) -> dict[str, int]:
    """Writes the dataset; returns the number of images per split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # values are 0..16
    labels = digits.target
    rng = np.random.RandomState(seed)
    tmp_dir = out_dir.rstrip('/') + '.tmp'
    shutil.rmtree(tmp_dir, ignore_errors=True)
    counts = {'train': 0, 'validation': 0}
    for digit in range(10):
        indices = np.flatnonzero(labels == digit)
        indices = indices[rng.permutation(len(indices))]
        num_val = round(validation_fraction * len(indices))
        for split, chosen in (('validation', indices[:num_val]), ('train', indices[num_val:])):
            class_dir = os.path.join(tmp_dir, split, str(digit))
            os.makedirs(class_dir, exist_ok=True)
            for index in sorted(chosen):
                image = Image.fromarray(images[index])
                image = image.resize((size, size), Image.BICUBIC).convert('RGB')
                image.save(os.path.join(class_dir, f'{index:04d}.png'))
                counts[split] += 1
    # Replace any earlier copy only once the new one is complete.
    shutil.rmtree(out_dir, ignore_errors=True)
    os.rename(tmp_dir, out_dir)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='workdirs/digits_data', help='output directory')
    parser.add_argument('--size', type=int, default=32, help='side of the square PNGs')
    parser.add_argument('--validation_fraction', type=float, default=0.2)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    counts = write_digits(
        args.out, size=args.size, validation_fraction=args.validation_fraction, seed=args.seed
    )
    print(
        f'Wrote {counts["train"]} training and {counts["validation"]} validation images '
        f'({args.size}x{args.size}) to {args.out}/{{train,validation}}/<digit>/'
    )


if __name__ == '__main__':
    main()
