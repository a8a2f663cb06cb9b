#!/usr/bin/env python
"""Top-5 classes of images with converted weights or a train.py workdir.

    python predict.py --weights weights/small photo.jpg photos/ [--json]

See `python predict.py --help` (crossformer_jax.cli.predict).
"""

import sys

from crossformer_jax.cli.predict import main

if __name__ == '__main__':
    sys.exit(main())
