"""XLA compiler options for the forward-only (inference and evaluation) programs.

XLA:CPU hands every matmul to YNNPACK together with the elementwise work and reductions around it,
as one fusion. In a CrossFormer forward pass that makes one YNNPACK program of a block's residual
add, LayerNorm, fc1, GELU, fc2, the next residual add and the next LayerNorm, which runs slower
than the same matmuls given to YNNPACK alone with XLA's own loop fusions around them
(`xla_cpu_experimental_ynn_fusion_type=individual_dot`). Measured in one process, alternating the
two programs (benchmarks/README.md): crossformer_small inference at batch 32 1.34x faster,
crossformer_tiny 1.11x, logits within 8e-7 relative (plain JAX layers). With the CPU kernels
(`cpu_kernels`), LayerNorm is a custom call that already splits these fusions and the option is
neutral (0.98-0.99x, 2026-12-07, AMD VM). The train step (forward and backward) is faster with
XLA's default fusions (0.73x with the option), so training keeps them.

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
