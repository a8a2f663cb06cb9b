"""Built-in example: a small CrossFormer on scikit-learn's handwritten digits, on CPU in minutes.

    python scripts/make_digits_dataset.py   # writes workdirs/digits_data
    python train.py --config configs/digits_demo.py --workdir workdirs/digits_demo

1438 training and 359 validation images of 32x32 (upsampled 8x8 digits), ten classes. The model is
crossformer_tiny with a reduced width and depth and groups sized for an 8x8 token grid; training
goes through the same train.py, input pipeline and train step as ImageNet.
"""

from configs import common


def get_config():
    config = common.get_config('crossformer_tiny')
    config.model.embed_dim = 32
    config.model.depths = (1, 1, 2, 1)
    config.model.num_heads = (1, 2, 4, 8)
    config.model.group_size = (4, 4, 4, 4)
    config.model.interval = (2, 1, 1, 1)
    config.model.drop_path_rate = 0.0
    config.model.dtype = 'float32'  # bfloat16 is slow on most CPUs

    config.data.dataset = 'image_folder'
    config.data.data_dir = 'workdirs/digits_data'
    config.data.image_size = 32
    config.data.eval_crop_fraction = 1.0
    # Light augmentation: digits are not mirror-symmetric, and small enough not to need more.
    config.data.rrc_scale = (0.6, 1.0)
    config.data.rrc_ratio = (0.8, 1.25)
    config.data.hflip = False
    config.data.randaugment = ''
    config.data.random_erasing_prob = 0.0
    config.data.mean = (0.5, 0.5, 0.5)
    config.data.std = (0.5, 0.5, 0.5)
    config.data.shuffle_buffer = 2048

    config.mixup.mixup_alpha = 0.0
    config.mixup.cutmix_alpha = 0.0
    config.mixup.label_smoothing = 0.1

    config.batch_size = 64
    config.eval_batch_size = 128
    config.num_epochs = 30
    config.warmup_epochs = 2
    config.lr_reference_batch = 64  # the rates below are the actual rates
    config.base_lr = 2e-3
    config.warmup_lr = 1e-5
    config.min_lr = 1e-5

    config.log_every_steps = 50
    config.eval_every_steps = 110  # every 5 epochs
    config.checkpoint_every_steps = 200
    config.keep_checkpoints = 2
    return config
