"""Semantic FPN on CrossFormer-S, ADE20K (see configs/segmentation/common.py)."""

from configs.segmentation import common


def get_config():
    return common.get_config('fpn', 'small')
