"""Random variables of a model's own shapes, drawn with numpy, for tests that need some weights but
not the model's initialisation: compiling `model.init` takes tens of seconds on CPU (the random
initialisers of every parameter), eager `model.init` longer still."""

import math

import jax
import jax.numpy as jnp
import numpy as np


def random_variables(model, image_size=(64, 64), seed=0):
    """{collection: tree} like `model.init` at (1, H, W, 3): kernels ~ N(0, 1/fan_in), biases and
    BatchNorm means ~ 0.1 N, scales ~ 1 + 0.1 N, BatchNorm variances ~ U(0.5, 2)."""
    images = jax.ShapeDtypeStruct((1, *image_size, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == 'kernel':
            values = rng.standard_normal(leaf.shape) / math.sqrt(math.prod(leaf.shape[:-1]))
        elif name == 'scale':
            values = 1 + 0.1 * rng.standard_normal(leaf.shape)
        elif name == 'var':
            values = rng.uniform(0.5, 2.0, leaf.shape)
        else:
            values = 0.1 * rng.standard_normal(leaf.shape)
        return jnp.asarray(values, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)
