"""The published COCO RetinaNet recipe, shared by every configuration in this directory.

    python train.py --config configs/detection/retinanet_crossformer_small_coco.py \
        --workdir runs/retinanet_s --config.data.data_dir=/data/coco \
        --config.init_from=converted/crossformer_small      # ImageNet classifier -> backbone

12 epochs ("1x") at global batch 16: AdamW lr 1e-4, weight decay 1e-4 on every parameter, no
gradient clipping; linear warm-up over 500 iterations from 1e-3 of the rate, then x0.1 after
epochs 8 and 11. Images fitted into 1333 x 800 (aspect kept), flipped with probability 0.5,
normalised with the ImageNet mean/std, padded to a multiple of 32; evaluation at 1333 x 800,
COCO box AP on val2017.
"""

import ml_collections

from crossformer_jax.data.config import COCO_DEFAULTS

DROP_PATH = {'small': 0.2, 'base': 0.3, 'pp_small': 0.2}


def get_config(backbone: str, detector: str = 'retinanet') -> ml_collections.ConfigDict:
    """backbone 'small', 'base' or 'pp_small'; detector 'retinanet' or 'mask_rcnn' (the same 1x
    recipe; Mask R-CNN trains on the instance masks too)."""
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

    # The COCO defaults (crossformer_jax/data/config.py: image_scale, flip, mean/std, max_boxes).
    config.data = ml_collections.ConfigDict(dict(COCO_DEFAULTS))
    config.data.dataset = 'coco'  # DATA_DIR/{train2017,val2017}/, DATA_DIR/annotations/
    config.data.data_dir = ''
    config.data.train_split = 'train2017'
    config.data.eval_split = 'val2017'
    config.data.masks = detector == 'mask_rcnn'

    config.batch_size = 16
    config.grad_accum_steps = 1
    config.num_epochs = 12
    config.num_train_steps = -1  # > 0 overrides num_epochs
    config.lr_schedule = 'step'
    config.lr_decay_epochs = (8, 11)
    config.lr_decay_factor = 0.1
    config.warmup_steps = 500
    config.warmup_ratio = 1e-3
    config.base_lr = 1e-4
    config.lr_reference_batch = 16  # the rates are the actual rates at batch 16
    config.weight_decay = 1e-4
    config.weight_decay_rule = 'all'
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
