"""Mask R-CNN with a CrossFormer++-S backbone on COCO, 1x schedule (see common.py); reported
46.4 box AP, 42.1 mask AP on val2017, 43.0M parameters."""

from configs.detection import common


def get_config():
    return common.get_config('pp_small', 'mask_rcnn')
