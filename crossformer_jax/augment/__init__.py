"""On-device batch augmentation of the training step: RandAugment, random erasing, Mixup /
CutMix and the normalisation, as pure functions of a key and a uint8 batch."""
