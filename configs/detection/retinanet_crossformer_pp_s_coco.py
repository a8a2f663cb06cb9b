"""RetinaNet with a CrossFormer++-S backbone on COCO, 1x schedule (see common.py); 33.0M
parameters."""

from configs.detection import common


def get_config():
    return common.get_config('pp_small')
