"""Fine-tunes a converted ImageNet-1K checkpoint at 384x384.

    python train.py --config configs/finetune_384.py:crossformer_base --workdir WORKDIR \
        --config.init_from=converted/crossformer_base --config.data.data_dir=/data/tfds

The argument after ':' names the variant (default crossformer_base). The Dynamic Position Bias
makes every weight independent of the input size, so the 224 checkpoint loads as is at 384; for a
dataset with another number of classes the head is re-initialised. The optimisation follows the
common recipe for fine-tuning hierarchical vision transformers at a higher resolution: 30 epochs,
5 of warm-up, learning rates 2e-5 / 2e-8 / 2e-7 per 512 images, weight decay 1e-8, with the
training-from-scratch augmentation and the variant's stochastic depth.
"""

from configs import common


def get_config(model_name: str = 'crossformer_base'):
    config = common.get_config(model_name or 'crossformer_base')
    config.init_from = ''  # required: the converted checkpoint directory
    config.data.image_size = 384
    config.model.remat = True  # activations at 384 are ~3x those at 224
    config.num_epochs = 30
    config.warmup_epochs = 5
    config.base_lr = 2e-5
    config.warmup_lr = 2e-8
    config.min_lr = 2e-7
    config.weight_decay = 1e-8
    config.batch_size = 512
    config.eval_batch_size = 512
    return config
