"""The paper's ImageNet-1K recipe, shared by every configuration in this directory.

Each experiment file is a thin `get_config()` that calls `get_config(model_name)` here and changes
what differs. Any field can be overridden from the command line, e.g.
`--config.batch_size=256 --config.data.data_dir=/data/tfds`.
"""

import ml_collections

from crossformer_jax.data.config import DATA_DEFAULTS
from crossformer_jax.models.crossformer import VARIANTS


def get_config(model_name: str) -> ml_collections.ConfigDict:
    """Training from scratch on ImageNet-1K at 224, 300 epochs, global batch 1024."""
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Model: `name` picks the registered variant; every other field is passed to create_model as
    # an override (any CrossFormer field: embed_dim, depths, group_size, dropout_rate...).
    config.model = ml_collections.ConfigDict()
    config.model.name = model_name
    config.model.drop_path_rate = VARIANTS[model_name][
        'drop_path_rate'
    ]  # the variant's published rate
    config.model.dtype = 'bfloat16'  # compute dtype; parameters and optimizer state stay float32
    config.model.remat = False  # rematerialise every block (less memory, ~1/3 more compute)

    # A converted (or earlier) checkpoint directory written by crossformer_jax.weights.pretrained
    # to start from; a head of another size is re-initialised. '' trains from scratch.
    config.init_from = ''

    # Input pipeline (crossformer_jax.data): ImageNet-2012 from TFDS with the paper's
    # augmentation; every field and its meaning in crossformer_jax.data.config.DATA_DEFAULTS.
    config.data = ml_collections.ConfigDict(dict(DATA_DEFAULTS))

    # Mixup / CutMix on device, label smoothing folded into the mixed targets.
    config.mixup = ml_collections.ConfigDict()
    config.mixup.mixup_alpha = 0.8
    config.mixup.cutmix_alpha = 1.0
    config.mixup.switch_prob = 0.5
    config.mixup.label_smoothing = 0.1

    # Optimisation. Learning rates are for a batch of lr_reference_batch and are scaled by
    # batch_size / lr_reference_batch (5e-4 * 1024 / 512 = 1e-3 at the paper's batch).
    config.batch_size = 1024  # global, over all devices and hosts
    config.grad_accum_steps = 1  # micro-batches per optimizer step (batch_size is the total)
    config.num_epochs = 300
    config.num_train_steps = -1  # > 0 overrides num_epochs (the schedule follows it)
    config.warmup_epochs = 20
    config.base_lr = 5e-4
    config.warmup_lr = 5e-7
    config.min_lr = 5e-6
    config.lr_reference_batch = 512
    config.weight_decay = 0.05  # not applied to 1-D parameters (biases, norm scales)
    config.adam_b1 = 0.9
    config.adam_b2 = 0.999
    config.adam_eps = 1e-8
    config.grad_clip_norm = 5.0

    # Parallelism: data parallel over all devices; fsdp=True also splits parameters and
    # optimizer state (largest dimension divisible by the device count, arrays >= fsdp_min_size).
    config.fsdp = False
    config.fsdp_min_size = 2**16

    # Evaluation, logging, checkpoints.
    config.eval_batch_size = 1024
    config.eval_every_steps = -1  # <= 0: once per epoch (and always at the end)
    config.log_every_steps = 100
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3  # last N in WORKDIR/checkpoints (+ the best in checkpoints_best)
    config.eval_checkpoint = 'best'  # --mode evaluate: 'best' or 'latest' checkpoint of the workdir

    # --mode throughput: forward pass only.
    config.throughput = ml_collections.ConfigDict()
    config.throughput.batch_size = 0  # 0: config.batch_size
    config.throughput.warmup_steps = 3
    config.throughput.num_steps = 20
    return config
