"""The models: the CrossFormer family, the dense-prediction heads, one registry, the primitives.

Importing this package registers every family, so `create_model(name)` builds any of them.
"""

from crossformer_jax.models import crossformer, detection, mask_rcnn, segmentation
from crossformer_jax.models.registry import create_model, list_models, model_spec

__all__ = [
    'create_model',
    'crossformer',
    'detection',
    'list_models',
    'mask_rcnn',
    'model_spec',
    'segmentation',
]
