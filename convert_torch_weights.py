#!/usr/bin/env python
"""Convert a PyTorch CrossFormer / CrossFormer++ checkpoint into a crossformer_jax directory.

    python convert_torch_weights.py --checkpoint crossformer-s.pth --output weights/small [--verify]

See `python convert_torch_weights.py --help` (crossformer_jax.cli.convert).
"""

import sys

from crossformer_jax.cli.convert import main

if __name__ == '__main__':
    sys.exit(main())
