"""Cascade Mask R-CNN with a CrossFormer-S backbone on COCO, 3x schedule with multi-scale
training and random crops (see common.py); reported 52.2 box AP, 45.2 mask AP on val2017.

Three R-CNN stages (IoU 0.5 / 0.6 / 0.7, loss weights 1 / 0.5 / 0.25), their box heads of four
3x3 convolutions with BatchNorm and one fc, trained with Swin Transformer's GIoU loss on the
decoded boxes (config.two_stage.rcnn_box_loss = 'giou'; weight 10). The BatchNorm statistics are
those of the global batch (Swin's SyncBN)."""

from configs.detection import common


def get_config():
    return common.get_config('small', 'cascade_mask_rcnn', schedule='3x')
