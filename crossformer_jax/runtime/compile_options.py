"""XLA compiler options for the forward-only (inference and evaluation) programs.

XLA:CPU hands every matmul to YNNPACK together with the elementwise work and reductions around it,
as one fusion. In a CrossFormer forward pass that makes one YNNPACK program of a block's residual
add, LayerNorm, fc1, GELU, fc2, the next residual add and the next LayerNorm, which runs slower
than the same matmuls given to YNNPACK alone with XLA's own loop fusions around them
(`xla_cpu_experimental_ynn_fusion_type=individual_dot`; benchmarks/README.md has the figures). The
train step (forward and backward) is faster with XLA's default fusions, so training keeps them.

Use: ``jax.jit(forward, compiler_options=inference_compiler_options())``. Other backends, and
XLA versions without the option, get no options.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

CPU_INFERENCE_OPTIONS = {
    'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT',
}


@functools.cache
def inference_compiler_options(backend: str | None = None) -> dict[str, str]:
    """Compiler options for a forward-only program on `backend` (default: JAX's default backend).

    On CPU, CPU_INFERENCE_OPTIONS when this XLA knows them (checked once by compiling a matmul),
    else {}; {} on every other backend.
    """
    backend = backend or jax.default_backend()
    if backend != 'cpu':
        return {}
    try:
        jax.jit(lambda x: x @ x, compiler_options=CPU_INFERENCE_OPTIONS).lower(
            jnp.ones((2, 2), jnp.float32)
        ).compile()
    except jax.errors.JaxRuntimeError:
        return {}
    return dict(CPU_INFERENCE_OPTIONS)
