"""Mask R-CNN with a CrossFormer-S backbone on COCO, 1x schedule (see common.py); reported
45.4 box AP, 41.4 mask AP on val2017, 50.2M parameters."""

from configs.detection import common


def get_config():
    return common.get_config('small', 'mask_rcnn')
