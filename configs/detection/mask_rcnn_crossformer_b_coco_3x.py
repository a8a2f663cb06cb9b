"""Mask R-CNN with a CrossFormer-B backbone on COCO, 3x schedule with multi-scale training and
random crops (see common.py); reported 49.8 box AP, 44.5 mask AP on val2017."""

from configs.detection import common


def get_config():
    return common.get_config('base', 'mask_rcnn', schedule='3x')
