"""CrossFormer and CrossFormer++ in JAX/Flax.

create_model(name, num_classes=None, **kwargs)  -> any registered model as a flax.linen.Module
convert_torch_state_dict(state_dict, name)  -> Flax variables of a PyTorch state dict
save_pretrained / load_pretrained            -> converted weights on disk
count_params / count_macs                    -> model size and cost

The models compute in plain JAX on every backend; $CROSSFORMER_CPU_KERNELS=1 switches on the
XLA:CPU plug-in at import (`crossformer_jax.cpu`).
"""

from crossformer_jax import cpu
from crossformer_jax.models import create_model, list_models
from crossformer_jax.models.complexity import count_macs, count_params
from crossformer_jax.models.crossformer import VARIANTS, CrossFormer
from crossformer_jax.weights.convert import convert_torch_state_dict
from crossformer_jax.weights.pretrained import load_pretrained, save_pretrained

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

cpu.enable_from_environment()
