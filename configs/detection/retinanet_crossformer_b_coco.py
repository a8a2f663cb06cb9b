"""RetinaNet with a CrossFormer-B backbone on COCO, 1x schedule (see common.py); reported 46.2
box AP on val2017, 62.1M parameters."""

from configs.detection import common


def get_config():
    return common.get_config('base')
