"""The original PyTorch training loader, rebuilt on PIL and torch for the input benchmark.

The CrossFormer training code feeds ImageNet through timm's training transform (random resized
crop 224 bicubic, horizontal flip, RandAugment ``rand-m9-mstd0.5-inc1`` with bicubic geometric
ops and the mean colour as fill, ToTensor, Normalize, RandomErasing 0.25 in 'pixel' mode) on PIL
images, in a ``torch.utils.data.DataLoader`` with worker processes. timm and torchvision are not
dependencies of this project, so this module writes the same steps with PIL, numpy and torch, at
the same cost per image: every pixel operation is the PIL or torch call that timm ends in.

    loader = reference_loader(files, batch_size=64, workers=2)
    images, labels = next(iter(loader))   # float32 (64, 3, 224, 224), int64 (64,)
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from crossformer_jax.augment.randaugment import INCREASING_OPS
from crossformer_jax.data.config import IMAGENET_MEAN, IMAGENET_STD

FILL = tuple(round(255 * m) for m in IMAGENET_MEAN)
BICUBIC = Image.Resampling.BICUBIC


def random_resized_crop(image: Image.Image, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Area fraction ~ U(scale), log aspect ~ U(log ratio), 10 tries, else the centre crop of
    the clamped aspect; then a bicubic resize to ``size x size``."""
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * random.uniform(*scale)
        aspect = math.exp(random.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = random.randint(0, height - h), random.randint(0, width - w)
            break
    else:
        aspect_in = width / height
        if aspect_in < ratio[0]:
            w, h = width, round(width / ratio[0])
        elif aspect_in > ratio[1]:
            h, w = height, round(height * ratio[1])
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    return image.crop((left, top, left + w, top + h)).resize((size, size), BICUBIC)


def _affine(image: Image.Image, coefficients) -> Image.Image:
    return image.transform(image.size, Image.AFFINE, coefficients, BICUBIC, fillcolor=FILL)


def _signed(value: float) -> float:
    return -value if random.random() < 0.5 else value


def _solarize_add(image: Image.Image, addition: int) -> Image.Image:
    table = [min(255, v + addition) if v < 128 else v for v in range(256)]
    return image.point(table * 3)


def _apply(name: str, image: Image.Image, level: float) -> Image.Image:
    """The increasing-set op ``name`` at ``level`` = magnitude / 10."""
    width, height = image.size
    if name == 'AutoContrast':
        return ImageOps.autocontrast(image)
    if name == 'Equalize':
        return ImageOps.equalize(image)
    if name == 'Invert':
        return ImageOps.invert(image)
    if name == 'Rotate':
        return image.rotate(_signed(30 * level), resample=BICUBIC, fillcolor=FILL)
    if name == 'PosterizeIncreasing':
        bits = 4 - int(4 * level)  # 0 at level 1, which PIL's posterize refuses: all black
        return ImageOps.posterize(image, bits) if bits else image.point([0] * 768)
    if name == 'SolarizeIncreasing':
        return ImageOps.solarize(image, 256 - int(256 * level))
    if name == 'SolarizeAdd':
        return _solarize_add(image, int(110 * level))
    enhancers = {
        'ColorIncreasing': ImageEnhance.Color,
        'ContrastIncreasing': ImageEnhance.Contrast,
        'BrightnessIncreasing': ImageEnhance.Brightness,
        'SharpnessIncreasing': ImageEnhance.Sharpness,
    }
    if name in enhancers:
        return enhancers[name](image).enhance(1 + _signed(0.9 * level))
    if name == 'ShearX':
        return _affine(image, (1, _signed(0.3 * level), 0, 0, 1, 0))
    if name == 'ShearY':
        return _affine(image, (1, 0, 0, _signed(0.3 * level), 1, 0))
    if name == 'TranslateXRel':
        return _affine(image, (1, 0, _signed(0.45 * level) * width, 0, 1, 0))
    if name == 'TranslateYRel':
        return _affine(image, (1, 0, 0, 0, 1, _signed(0.45 * level) * height))
    raise ValueError(f'unknown op {name!r}')


OPS = INCREASING_OPS  # timm's increasing op set ('inc1')


def randaugment(image: Image.Image, layers=2, magnitude=9.0, std=0.5, prob=0.5) -> Image.Image:
    """``rand-m9-mstd0.5-inc1``: ``layers`` ops drawn with replacement, each applied with
    probability ``prob`` at magnitude N(m, std) clipped to [0, 10]."""
    for name in random.choices(OPS, k=layers):
        if random.random() > prob:
            continue
        level = min(max(random.gauss(magnitude, std), 0.0), 10.0) / 10.0
        image = _apply(name, image, level)
    return image


def random_erasing(x: torch.Tensor, prob=0.25, min_area=0.02, max_area=1 / 3, min_aspect=0.3):
    """One rectangle of N(0, 1) noise per image with probability ``prob`` ('pixel' mode);
    ``x``: normalised float32 (3, H, W), changed in place."""
    if random.random() > prob:
        return x
    channels, height, width = x.shape
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(10):
        target = height * width * random.uniform(min_area, max_area)
        aspect = math.exp(random.uniform(*log_aspect))
        h = round(math.sqrt(target * aspect))
        w = round(math.sqrt(target / aspect))
        if w < width and h < height:
            top, left = random.randint(0, height - h), random.randint(0, width - w)
            x[:, top : top + h, left : left + w] = torch.empty(channels, h, w).normal_()
            break
    return x


class TrainTransform:
    """PIL image -> normalised, augmented float32 (3, size, size) tensor."""

    def __init__(self, size: int = 224):
        self.size = size
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = random_resized_crop(image, self.size)
        if random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image = randaugment(image)
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        x = (x.float().div_(255.0) - self.mean) / self.std
        return random_erasing(x)


class FileDataset(torch.utils.data.Dataset):
    """(path, label) pairs read as RGB PIL images, as an image-folder dataset does."""

    def __init__(self, files: list[tuple[str, int]], transform):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path, label = self.files[index]
        with open(path, 'rb') as f:
            image = Image.open(f).convert('RGB')
        return self.transform(image), label


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)
    random.seed(torch.initial_seed() % 2**32)


def reference_loader(files, *, batch_size: int, workers: int, size: int = 224):
    """A DataLoader of shuffled batches of the original training recipe (one epoch per
    iteration) from ``workers`` processes."""
    torch.manual_seed(0)
    return torch.utils.data.DataLoader(
        FileDataset(files, TrainTransform(size)),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        worker_init_fn=_worker_init,
        persistent_workers=workers > 0,
    )
