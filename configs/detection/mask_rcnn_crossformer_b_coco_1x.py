"""Mask R-CNN with a CrossFormer-B backbone on COCO, 1x schedule (see common.py); reported
47.2 box AP, 42.7 mask AP on val2017, 71.5M parameters."""

from configs.detection import common


def get_config():
    return common.get_config('base', 'mask_rcnn')
