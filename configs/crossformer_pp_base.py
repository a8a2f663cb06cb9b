"""CrossFormer++-Base on ImageNet-1K at 224, the paper's recipe (see configs/common.py)."""

from configs import common


def get_config():
    return common.get_config('crossformer_pp_base')
