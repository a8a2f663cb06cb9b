"""Built-in segmentation example: digits pasted on photographs, a small Semantic FPN, on CPU.

    python scripts/make_segmentation_demo.py   # writes workdirs/segmentation_demo_data
    python train.py --config configs/segmentation/digits_demo.py --workdir workdirs/seg_demo

2000 training and 200 validation images of 64x64 in the ADE20K layout, one digit each, 11
classes (background and ten digits). The model is fpn_crossformer_small narrowed and shortened,
with groups sized for a 16x16 token grid; training goes through the same train.py, input pipeline,
train step and whole-image mIoU evaluation as ADE20K, with plain pixel cross-entropy. The recipe
is the demo's own: AdamW at a higher rate than the ADE20K recipes (3e-3, 50-step warm-up, poly
decay), no weight decay on norms, gradients clipped at norm 1, no random rescale or photometric
distortion (the digits already vary in size, place and colour).
"""

from configs.segmentation import common


def get_config():
    config = common.get_config('fpn', 'small')
    config.model.embed_dim = 32
    config.model.depths = (1, 1, 1, 1)
    config.model.num_heads = (1, 2, 4, 8)
    config.model.group_size = (4, 4, 4, 2)
    config.model.interval = (2, 1, 1, 1)
    config.model.drop_path_rate = 0.0
    config.model.head_channels = 64
    config.model.neck_channels = 64

    config.data.data_dir = 'workdirs/segmentation_demo_data'
    config.data.num_classes = 11
    config.data.image_size = 64
    config.data.scale = (64, 64)
    config.data.ratio_range = (1.0, 1.0)  # the digits already come in many sizes
    config.data.cat_max_ratio = 1.0  # the background dominates every crop; no redraws
    config.data.hflip = False  # digits are not mirror-symmetric
    config.data.photometric_distortion = False  # the colours are already random
    config.data.num_parallel_calls = 2

    config.batch_size = 16
    config.num_train_steps = 1200
    config.base_lr = 3e-3
    config.warmup_steps = 50
    config.warmup_ratio = 1e-3
    config.weight_decay = 1e-4
    config.weight_decay_rule = 'no_norm'
    config.grad_clip_norm = 1.0
    config.poly_power = 0.9

    config.log_every_steps = 50
    config.eval_every_steps = 400
    config.checkpoint_every_steps = 400
    config.keep_checkpoints = 1
    return config
