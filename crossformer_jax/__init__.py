"""CrossFormer and CrossFormer++ in JAX/Flax."""

from crossformer_jax.crossformer import VARIANTS, CrossFormer, create_model, list_models

__all__ = ['VARIANTS', 'CrossFormer', 'create_model', 'list_models']
