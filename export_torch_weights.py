#!/usr/bin/env python
"""Write crossformer_jax weights as a PyTorch checkpoint in the original layouts.

    python export_torch_weights.py --weights weights/small --output crossformer-s.pth

See `python export_torch_weights.py --help` (crossformer_jax.cli.export).
"""

import sys

from crossformer_jax.cli.export import main

if __name__ == '__main__':
    sys.exit(main())
