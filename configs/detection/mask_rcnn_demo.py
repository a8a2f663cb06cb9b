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

from configs.detection import demo


def get_config():
    config = demo.demo_config('mask_rcnn')
    config.model.rpn_channels = 64
    config.model.box_fc_channels = 256
    config.model.num_mask_convs = 2
    config.model.mask_channels = 64
    # RoIAlign exact up to RoI sides of 28 map pixels (112 image pixels on the finest level; the
    # images are 160 x 128): a patch of 30 x 16 pixels per RoI instead of 58 x 32.
    config.model.roi_exact_extent = 28
    config.data.mask_size = 28
    # Fewer proposals and sampled RoIs than COCO's 2000 / 1000 / 512: the images are small.
    config.two_stage = dict(
        train_pre_nms_top_k=500,
        train_proposals=200,
        test_pre_nms_top_k=500,
        test_proposals=200,
        rcnn_samples=64,
    )
    return config
