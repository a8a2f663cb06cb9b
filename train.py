#!/usr/bin/env python
"""Train, evaluate or time a CrossFormer model (config.task); see crossformer_jax.cli.train.

python train.py --config configs/crossformer_tiny.py --workdir runs/tiny
"""

from absl import flags

from crossformer_jax.cli import train

flags.adopt_module_key_flags(train)

if __name__ == '__main__':
    train.run()
