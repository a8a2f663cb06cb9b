"""Opt-in speed-ups for runs on XLA:CPU: a plug-in, outside the model path.

`enable()` builds the custom calls of `crossformer_jax.cpu.kernels` (MKL products, fused attention,
LayerNorm and embedding convolutions, with gradients written for XLA:CPU) and installs them as the
models' primitives (`crossformer_jax.models.ops.set_ops`); the models trace plain JAX otherwise.
It needs the `cpu` extra (`pip install 'crossformer_jax[cpu]'`: MKL, x86-64 Linux) and a C++
compiler; when anything is missing it warns and leaves the plain primitives in place. Setting
$CROSSFORMER_CPU_KERNELS before `crossformer_jax` is imported does the same: `1` (or `on`) enables
softly, `mkl` makes a failed build an error, `0` (or unset) leaves it off.

Enable it for CPU runs only: programs compiled for an accelerator keep XLA's formulas inside the
plug-in's gradients (`jax.lax.platform_dependent`), not the plain primitives, and
`train.py --mode compile` always traces with the plain ones. `crossformer_jax.cpu.host_memory`
holds the other CPU-only setting, glibc's handling of freed memory, which train.py applies on CPU
runs.
"""

from __future__ import annotations

import logging
import os

from crossformer_jax.cpu import kernels
from crossformer_jax.models import ops

ENV_VAR = 'CROSSFORMER_CPU_KERNELS'
# 'xla' and 'auto' are the values of earlier versions, where the kernels were on by default.
_ENV_CHOICES = {
    **dict.fromkeys(('', '0', 'off', 'xla'), 'off'),
    **dict.fromkeys(('1', 'on', 'auto'), 'on'),
    'mkl': 'strict',
}

_log = logging.getLogger(__name__)


def enable(strict: bool = False) -> bool:
    """Builds and loads the CPU kernels and makes them the models' primitives. Returns True when
    they are in place; on any build or I/O failure warns and returns False (raises
    CpuKernelsUnavailable instead with strict=True), the plain primitives staying in place."""
    try:
        kernels.load()
    except (kernels.CpuKernelsUnavailable, OSError) as error:
        if strict:
            raise
        _log.warning(
            'crossformer_jax.cpu: kernels not enabled, the models stay plain JAX: %s', error
        )
        return False
    ops.set_ops(kernels.CPU_OPS)
    return True


def disable() -> None:
    """Puts the plain primitives back (the kernels stay loaded for direct calls)."""
    ops.set_ops(ops.PLAIN)


def enabled() -> bool:
    """Whether models traced now use the CPU kernels."""
    return ops.current() is kernels.CPU_OPS


def enable_from_environment() -> bool:
    """Applies $CROSSFORMER_CPU_KERNELS (see the module docstring); ValueError for another value."""
    value = os.environ.get(ENV_VAR, '').strip().lower()
    if value not in _ENV_CHOICES:
        raise ValueError(
            f'${ENV_VAR} must be one of {", ".join(repr(v) for v in _ENV_CHOICES)}; found {value!r}'
        )
    choice = _ENV_CHOICES[value]
    return choice != 'off' and enable(strict=choice == 'strict')
