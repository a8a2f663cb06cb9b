"""Built-in instance segmentation example: the detection demo's shapes (COCO layout, polygon
masks), a small Mask R-CNN, on CPU.

    python scripts/make_detection_demo.py   # writes workdirs/detection_demo_data (COCO layout)
    python train.py --config configs/detection/mask_rcnn_demo.py --workdir workdirs/mask_rcnn_demo

The model is mask_rcnn_crossformer_small narrowed and shortened (one block per stage, FPN, RPN,
box head and mask head of 64 channels, two mask convolutions), trained from scratch through the
same train.py, COCO loader (with the masks cropped to their boxes), train step and pycocotools box
and mask evaluation as COCO. Proposals, sampling, losses and post-processing are the recipe's;
the optimisation is the demo's own, as in configs/detection/demo.py.

Not yet a quick demo: on a 2-core CPU one step took more than 6 s (no step-50 log line after 5
minutes of training), far from the RetinaNet demo's ~0.15 s; the RoI heads' cost on the CPU is
the next thing to measure. The tests train a narrower copy for a few steps.
"""

from configs.detection import common


def get_config():
    config = common.get_config('small', 'mask_rcnn')
    config.model.embed_dim = 32
    config.model.depths = (1, 1, 1, 1)
    config.model.num_heads = (1, 2, 4, 8)
    config.model.group_size = (4, 4, 4, 4)
    config.model.interval = (8, 4, 2, 1)
    config.model.drop_path_rate = 0.0
    config.model.fpn_channels = 64
    config.model.rpn_channels = 64
    config.model.box_fc_channels = 256
    config.model.num_mask_convs = 2
    config.model.mask_channels = 64

    # Fewer proposals and sampled RoIs than COCO's 2000 / 1000 / 512: the images are small.
    config.two_stage = dict(
        train_pre_nms_top_k=500,
        train_proposals=200,
        test_pre_nms_top_k=500,
        test_proposals=200,
        rcnn_samples=128,
    )

    config.data.data_dir = 'workdirs/detection_demo_data'
    config.data.image_scale = (160, 128)
    config.data.max_boxes = 8
    config.data.mask_size = 28
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
