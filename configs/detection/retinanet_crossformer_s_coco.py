"""RetinaNet with a CrossFormer-S backbone on COCO, 1x schedule (see common.py); reported 44.4
box AP on val2017, 40.8M parameters."""

from configs.detection import common


def get_config():
    return common.get_config('small')
