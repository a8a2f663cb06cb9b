"""The published ADE20K recipes, shared by every configuration in this directory.

    python train.py --config configs/segmentation/upernet_crossformer_small_ade20k.py \
        --workdir runs/upernet_s --config.data.data_dir=/data/ADEChallengeData2016 \
        --config.init_from=converted/crossformer_small      # ImageNet classifier -> backbone

UPerNet: 160k iterations at global batch 16, AdamW lr 6e-5, weight decay 0.01 except on the
backbone's LayerNorms named norm / norm1 / norm2, poly (power 1) with a 1,500-iteration linear
warm-up, auxiliary FCN loss x 0.4. Semantic FPN: 80k iterations, AdamW lr 1e-4, weight decay 1e-4
on everything, poly power 0.9, no warm-up. Both: 512x512 crops of images rescaled to fit
(2048r, 512r), r ~ U(0.5, 2.0); evaluation on whole images fitted to (2048, 512).
"""

import ml_collections

from crossformer_jax.data.config import ADE20K_DEFAULTS, IMAGENET_MEAN_255, IMAGENET_STD_255

DROP_PATH = {'small': 0.2, 'base': 0.3, 'large': 0.5, 'pp_small': 0.2}


def get_config(head: str, backbone: str) -> ml_collections.ConfigDict:
    """head 'upernet' or 'fpn'; backbone 'small', 'base', 'large' or 'pp_small'."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.task = 'segmentation'

    config.model = ml_collections.ConfigDict()
    config.model.name = f'{head}_crossformer_{backbone}'
    config.model.drop_path_rate = DROP_PATH[backbone]
    config.model.dtype = 'float32'
    config.model.remat = False

    # A converted ImageNet classifier (its weights initialise the backbone; the heads start
    # fresh) or a converted segmentation checkpoint; '' trains from scratch.
    config.init_from = ''

    # The ADE20K defaults (crossformer_jax/data/config.py), then the recipe's own fields.
    config.data = ml_collections.ConfigDict(dict(ADE20K_DEFAULTS))
    config.data.dataset = 'ade20k'  # DATA_DIR/{images,annotations}/{training,validation}/
    config.data.data_dir = ''
    config.data.eval_split = 'validation'
    config.data.num_classes = 150
    config.data.image_size = 512  # training crop (and padding) size
    config.data.scale = (2048, 512)  # rescale to fit (long, short), times the ratio
    config.data.hflip = True
    config.data.mean = IMAGENET_MEAN_255
    config.data.std = IMAGENET_STD_255
    config.data.num_parallel_calls = -1
    config.data.prefetch = 2

    # Evaluation on whole images: ratios of data.scale, optionally with horizontal flips.
    # Multi-scale as published: --config.eval.scales='(0.5,0.75,1.0,1.25,1.5,1.75)'.
    config.eval = ml_collections.ConfigDict()
    config.eval.scales = (1.0,)
    config.eval.flip = False

    config.batch_size = 16
    config.grad_accum_steps = 1
    config.num_epochs = 0  # unused: num_train_steps below sets the length
    config.lr_schedule = 'poly'
    config.lr_reference_batch = 16  # the rates are the actual rates at batch 16
    config.adam_b1 = 0.9
    config.adam_b2 = 0.999
    config.adam_eps = 1e-8
    config.grad_clip_norm = 0.0  # no clipping
    if head == 'upernet':
        config.num_train_steps = 160_000
        config.base_lr = 6e-5
        config.poly_power = 1.0
        config.warmup_steps = 1500
        config.warmup_ratio = 1e-6
        config.weight_decay = 0.01
        config.weight_decay_rule = 'no_norm'
        config.aux_loss_weight = 0.4
    else:
        config.num_train_steps = 80_000
        config.base_lr = 1e-4
        config.poly_power = 0.9
        config.warmup_steps = 0
        config.warmup_ratio = 1.0
        config.weight_decay = 1e-4
        config.weight_decay_rule = 'all'
        config.aux_loss_weight = 0.0  # Semantic FPN has no auxiliary head

    config.fsdp = False
    config.fsdp_min_size = 2**16

    config.eval_batch_size = 8  # unused by whole-image evaluation (one image per device)
    config.eval_every_steps = 16_000 if head == 'upernet' else 8_000
    config.log_every_steps = 50
    config.checkpoint_every_steps = 4_000
    config.keep_checkpoints = 3
    config.eval_checkpoint = 'best'

    config.throughput = ml_collections.ConfigDict()
    config.throughput.batch_size = 0
    config.throughput.warmup_steps = 3
    config.throughput.num_steps = 20
    return config
