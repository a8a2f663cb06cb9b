"""Built-in instance segmentation example: the detection demo's data (COCO layout, polygon
masks), a small Mask R-CNN, on CPU.

    make demo-mask    # or:
    python scripts/make_detection_demo.py   # writes workdirs/detection_demo_data (COCO layout)
    python train.py --config configs/detection/mask_rcnn_demo.py --workdir workdirs/mask_rcnn_demo

The model is mask_rcnn_crossformer_small narrowed and shortened (one block per stage, FPN, RPN,
box head and mask head of 64 channels, two mask convolutions), trained from scratch for two
epochs through the same train.py, COCO loader (with the masks cropped to their boxes), train
step and pycocotools box and mask evaluation as COCO. Proposals, sampling, losses and
post-processing are the recipe's, with fewer proposals and sampled RoIs (the images are small);
the optimisation is the demo's own, as in configs/detection/demo.py.
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
    config.num_epochs = 2
    config.lr_decay_epochs = (1.5,)
    # Fewer proposals and sampled RoIs than COCO's 2000 / 1000 / 512: the images are small.
    config.two_stage.update(
        train_pre_nms_top_k=500,
        train_proposals=200,
        test_pre_nms_top_k=500,
        test_proposals=200,
        rcnn_samples=64,
    )
    return config
