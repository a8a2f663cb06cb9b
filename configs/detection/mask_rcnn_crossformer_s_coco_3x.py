"""Mask R-CNN with a CrossFormer-S backbone on COCO, 3x schedule with multi-scale training and
random crops (see common.py); reported 48.7 box AP, 43.9 mask AP on val2017."""

from configs.detection import common


def get_config():
    return common.get_config('small', 'mask_rcnn', schedule='3x')
