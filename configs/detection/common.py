"""The published COCO detection recipes, shared by every configuration in this directory.

    python train.py --config configs/detection/retinanet_crossformer_s_coco.py \
        --workdir runs/retinanet_s --config.data.data_dir=/data/coco \
        --config.init_from=converted/crossformer_small      # ImageNet classifier -> backbone

Both schedules train at global batch 16 with AdamW (betas 0.9, 0.999), no gradient clipping and
a linear warm-up over 500 iterations from 1e-3 of the rate, normalise with the ImageNet mean/std,
pad to a multiple of 32 and evaluate at 1333 x 800 (COCO box AP on val2017, mask AP too for the
(Cascade) Mask R-CNN).

"1x" (CrossFormer's released detection configs, e.g. mask_rcnn_crossformer_s_fpn_1x_coco.py):
12 epochs, lr 1e-4, weight decay 1e-4 on every parameter, x0.1 after epochs 8 and 11; images
fitted into 1333 x 800 (aspect kept), flipped with probability 0.5.

"3x" (the paper follows Swin Transformer's; the numbers are those of Swin's
mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_adamw_3x_coco.py and
cascade_mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_giou_4conv1f_adamw_3x_coco.py, the
warm-up that of MMDetection's schedule_1x.py they inherit): 36 epochs, lr 1e-4, weight decay
0.05, x0.1 after epochs 27 and 33; training images flipped with probability 0.5, then, with
probability 1/2 each, either resized to a short side of 480, 512, ..., 800, or resized to a
short side of 400, 500 or 600, cropped to a random window with sides in [384, 600] and resized
to a short side of 480, ..., 800, the long side <= 1333 throughout
(``config.data.train_augment = 'multiscale_crop'``, the numbers in
crossformer_jax/data/config.py's COCO_DEFAULTS, the rules in crossformer_jax/data/coco.py).
Swin leaves out of the weight decay every parameter whose name contains 'norm',
'relative_position_bias_table' or 'absolute_pos_embed' (biases are decayed); on CrossFormer's
PyTorch names that is the LayerNorms patch_embed.norm, norm1, norm2 and downsample.norm (the
backbone has neither table nor embedding: its position bias is the DPB, whose names match none
of the three), which is the optimizer's 'no_norm' rule. Stochastic depth stays at the backbone's
detection rate (DROP_PATH) in both schedules.
"""

import ml_collections

from crossformer_jax.data.config import COCO_DEFAULTS
from crossformer_jax.tasks.instance_segmentation import TWO_STAGE_DEFAULTS

DROP_PATH = {'small': 0.2, 'base': 0.3, 'pp_small': 0.2}
DETECTORS = ('retinanet', 'mask_rcnn', 'cascade_mask_rcnn')
SCHEDULES = ('1x', '3x')


def get_config(
    backbone: str, detector: str = 'retinanet', schedule: str = '1x'
) -> ml_collections.ConfigDict:
    """backbone 'small', 'base' or 'pp_small'; detector 'retinanet', 'mask_rcnn' or
    'cascade_mask_rcnn' (the two-stage models train on the instance masks too); schedule '1x'
    or '3x' (see the module doc)."""
    if detector not in DETECTORS:
        raise ValueError(f'detector must be one of {DETECTORS}, got {detector!r}')
    if schedule not in SCHEDULES:
        raise ValueError(f'schedule must be one of {SCHEDULES}, got {schedule!r}')
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.task = 'detection' if detector == 'retinanet' else 'instance_segmentation'

    config.model = ml_collections.ConfigDict()
    config.model.name = f'{detector}_crossformer_{backbone}'
    config.model.drop_path_rate = DROP_PATH[backbone]
    config.model.dtype = 'float32'
    config.model.remat = False

    # A converted ImageNet classifier (its weights initialise the backbone; the FPN and head
    # start fresh) or a converted RetinaNet checkpoint; '' trains from scratch.
    config.init_from = ''

    # The COCO defaults (crossformer_jax/data/config.py: image_scale, flip, mean/std, max_boxes,
    # the multi-scale and crop numbers).
    config.data = ml_collections.ConfigDict(dict(COCO_DEFAULTS))
    config.data.dataset = 'coco'  # DATA_DIR/{train2017,val2017}/, DATA_DIR/annotations/
    config.data.data_dir = ''
    config.data.train_split = 'train2017'
    config.data.eval_split = 'val2017'
    config.data.masks = detector != 'retinanet'
    config.data.train_augment = 'resize' if schedule == '1x' else 'multiscale_crop'
    if detector != 'retinanet':
        # Proposal counts, R-CNN sampling and box loss (crossformer_jax/tasks/
        # instance_segmentation.py); Swin's cascade heads regress decoded boxes with a GIoU loss.
        config.two_stage = ml_collections.ConfigDict(dict(TWO_STAGE_DEFAULTS))
        config.two_stage.rcnn_box_loss = 'giou' if detector == 'cascade_mask_rcnn' else 'l1'

    config.batch_size = 16
    config.grad_accum_steps = 1
    config.num_train_steps = -1  # > 0 overrides num_epochs
    config.lr_schedule = 'step'
    config.lr_decay_factor = 0.1
    config.warmup_steps = 500
    config.warmup_ratio = 1e-3
    config.base_lr = 1e-4
    config.lr_reference_batch = 16  # the rates are the actual rates at batch 16
    if schedule == '1x':
        config.num_epochs = 12
        config.lr_decay_epochs = (8, 11)
        config.weight_decay = 1e-4
        config.weight_decay_rule = 'all'
    else:
        config.num_epochs = 36
        config.lr_decay_epochs = (27, 33)
        config.weight_decay = 0.05
        config.weight_decay_rule = 'no_norm'
    config.adam_b1 = 0.9
    config.adam_b2 = 0.999
    config.adam_eps = 1e-8
    config.grad_clip_norm = 0.0  # no clipping

    config.fsdp = False
    config.fsdp_min_size = 2**16

    config.eval_batch_size = 8
    config.eval_every_steps = -1  # <= 0: once per epoch (and always at the end)
    config.log_every_steps = 50
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    config.eval_checkpoint = 'best'

    config.throughput = ml_collections.ConfigDict()
    config.throughput.batch_size = 0
    config.throughput.warmup_steps = 3
    config.throughput.num_steps = 20
    return config
