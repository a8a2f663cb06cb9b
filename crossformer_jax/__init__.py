"""CrossFormer and CrossFormer++ in JAX/Flax.

create_model(name, num_classes=1000, features_only=False, **overrides) -> flax.linen.Module
convert_torch_state_dict(state_dict, name)  -> Flax variables of a PyTorch state dict
save_pretrained / load_pretrained            -> converted weights on disk
count_params / count_macs                    -> model size and cost
"""

from crossformer_jax.complexity import count_macs, count_params
from crossformer_jax.convert import convert_torch_state_dict
from crossformer_jax.crossformer import VARIANTS, CrossFormer, create_model, list_models
from crossformer_jax.pretrained import load_pretrained, save_pretrained

__all__ = [
    'VARIANTS',
    'CrossFormer',
    'convert_torch_state_dict',
    'count_macs',
    'count_params',
    'create_model',
    'list_models',
    'load_pretrained',
    'save_pretrained',
]
