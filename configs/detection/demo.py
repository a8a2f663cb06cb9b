"""Built-in detection example: digits and shapes pasted on photographs, a small RetinaNet, on CPU.

    python scripts/make_detection_demo.py   # writes workdirs/detection_demo_data (COCO layout)
    python train.py --config configs/detection/demo.py --workdir workdirs/detection_demo

Small images of both orientations in the COCO layout (JSON annotations with boxes and masks).
The model is retinanet_crossformer_small narrowed and shortened (one block per stage, FPN and head
of 64 channels, two stacked head convolutions), trained from scratch through the same train.py,
COCO loader, train step and pycocotools evaluation as COCO. The anchors, assignment, losses and
post-processing are the recipe's; the optimisation is the demo's own: AdamW at a higher rate, a
short warm-up, one step decay, gradients clipped at norm 1.
"""

from configs.detection import common


def demo_config(detector: str):
    """What the detection demos share: a narrowed, shortened backbone, the demo data and the
    optimisation; `detector` 'retinanet' or 'mask_rcnn' (see common.get_config)."""
    config = common.get_config('small', detector)
    config.model.embed_dim = 32
    config.model.depths = (1, 1, 1, 1)
    config.model.num_heads = (1, 2, 4, 8)
    config.model.group_size = (4, 4, 4, 4)
    config.model.interval = (8, 4, 2, 1)
    config.model.drop_path_rate = 0.0
    config.model.fpn_channels = 64

    config.data.data_dir = 'workdirs/detection_demo_data'
    config.data.image_scale = (160, 128)
    config.data.max_boxes = 8
    config.data.num_parallel_calls = 2

    config.batch_size = 16
    config.num_epochs = 6
    config.lr_decay_epochs = (5,)
    config.warmup_steps = 100
    config.base_lr = 1e-3
    config.grad_clip_norm = 1.0

    config.eval_batch_size = 16
    config.eval_every_steps = -1
    config.log_every_steps = 50
    config.checkpoint_every_steps = 500
    config.keep_checkpoints = 1
    return config


def get_config():
    config = demo_config('retinanet')
    config.model.head_channels = 64
    config.model.num_head_convs = 2
    return config
