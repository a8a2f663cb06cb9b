"""Float32 matmuls on XLA:CPU through MKL, as an XLA FFI custom call.

XLA:CPU gives matmuls to YNNPACK or Eigen, which run CrossFormer's dense layers at 0.4-0.9x the
speed of MKL's sgemm on the same cores (benchmarks/README.md, "Matmuls"). `matmul` computes
a @ b for 2-D float32 operands with MKL's single-threaded cblas_sgemm instead, on blocks of output
rows (or columns) shared out over XLA's own intra-op thread pool, so no second thread pool
competes with XLA's. Everywhere else (other dtypes, GPU/TPU, or without MKL) it is XLA's dot.
`crossformer.linear` uses it when it is not differentiated (inference: 1.06-1.11x faster
programs); a train step keeps XLA's dots, which XLA fuses with the elementwise work around them.

The custom call is crossformer_jax/cpu_matmul.cc, compiled with the C++ compiler (`$CXX`, else
`c++`) against the FFI headers that jaxlib ships, once per source and jaxlib version, into
`$CROSSFORMER_JAX_CACHE` (default `~/.cache/crossformer_jax`). MKL is the `mkl` package from
PyPI (`pip install 'crossformer_jax[cpu]'`), loaded with its sequential threading layer.

`CROSSFORMER_CPU_MATMUL=xla` turns the custom call off (XLA's dots everywhere);
`CROSSFORMER_CPU_MATMUL=mkl` makes a missing MKL or compiler an error instead of a warning.
`python -m crossformer_jax.cpu_matmul` builds the extension and says which path is used.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

ENV_VAR = 'CROSSFORMER_CPU_MATMUL'
CACHE_ENV_VAR = 'CROSSFORMER_JAX_CACHE'
TARGET_NAME = 'crossformer_matmul'
SOURCE = Path(__file__).with_name('cpu_matmul.cc')
MKL_SEQUENTIAL = 1  # MKL_Set_Threading_Layer's code for the sequential layer

_log = logging.getLogger(__name__)


class CpuMatmulUnavailable(RuntimeError):
    """The MKL custom call cannot be used here (no MKL, no compiler, or it failed to build)."""


def find_mkl_runtime() -> Path:
    """Path of libmkl_rt from the installed `mkl` distribution."""
    try:
        files = importlib.metadata.distribution('mkl').files or []
    except importlib.metadata.PackageNotFoundError as error:
        raise CpuMatmulUnavailable(
            "MKL is not installed: pip install 'crossformer_jax[cpu]' (the `mkl` package)"
        ) from error
    for file in files:
        if file.name.startswith('libmkl_rt.so'):
            return Path(file.locate()).resolve()
    raise CpuMatmulUnavailable('the installed `mkl` package has no libmkl_rt.so')


def cache_dir() -> Path:
    default = Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / 'crossformer_jax'
    return Path(os.environ.get(CACHE_ENV_VAR, default))


def build_extension() -> Path:
    """Compiles cpu_matmul.cc (once per source, jaxlib version and compiler) and returns the .so.

    The library is written to a temporary name and renamed into place, so processes that build at
    the same time never load a partial file.
    """
    compiler = os.environ.get('CXX', 'c++')
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + jaxlib.__version__.encode() + compiler.encode()).hexdigest()
    library = cache_dir() / f'cpu_matmul-{key[:16]}.so'
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=library.parent, suffix='.so', delete=False) as handle:
        partial = Path(handle.name)
    command = [
        compiler,
        '-O2',
        '-std=c++17',
        '-shared',
        '-fPIC',
        '-w',
        f'-I{jax.ffi.include_dir()}',
        str(SOURCE),
        '-o',
        str(partial),
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise CpuMatmulUnavailable(f'no C++ compiler {compiler!r} ({error}); set $CXX') from error
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise CpuMatmulUnavailable(
            f'compiling {SOURCE.name} failed ({" ".join(command)}):\n{result.stderr[-2000:]}'
        )
    os.replace(partial, library)
    return library


@functools.cache
def _load() -> None:
    """Loads MKL and the extension and registers the FFI target; raises CpuMatmulUnavailable."""
    mkl = ctypes.CDLL(str(find_mkl_runtime()))
    mkl.MKL_Set_Threading_Layer.restype = ctypes.c_int
    mkl.MKL_Set_Threading_Layer(MKL_SEQUENTIAL)  # threads are XLA's; before MKL's first call
    extension = ctypes.CDLL(str(build_extension()))
    extension.crossformer_set_sgemm(ctypes.cast(mkl.cblas_sgemm, ctypes.c_void_p))
    jax.ffi.register_ffi_target(
        TARGET_NAME, jax.ffi.pycapsule(extension.CrossformerMatmul), platform='cpu'
    )


@functools.cache
def mkl_matmul_enabled() -> bool:
    """Whether `matmul` uses the MKL custom call (default backend CPU, MKL and compiler found).

    Without MKL or a compiler it warns once and returns False, unless $CROSSFORMER_CPU_MATMUL is
    'mkl', which makes that an error; 'xla' returns False without trying.
    """
    choice = os.environ.get(ENV_VAR, 'auto')
    if choice not in ('auto', 'mkl', 'xla'):
        raise ValueError(f'${ENV_VAR} must be auto, mkl or xla, found {choice!r}')
    if choice == 'xla' or (choice == 'auto' and jax.default_backend() != 'cpu'):
        return False
    try:
        _load()
    except CpuMatmulUnavailable as error:
        if choice == 'mkl':
            raise
        _log.warning('CPU matmuls stay on XLA (set %s=xla to silence this): %s', ENV_VAR, error)
        return False
    return True


def _mkl_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    call = jax.ffi.ffi_call(
        TARGET_NAME,
        jax.ShapeDtypeStruct((a.shape[0], b.shape[1]), jnp.float32),
        vmap_method='sequential',
    )
    return call(a, b)


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """a (M, K) @ b (K, N) -> (M, N): the MKL custom call for float32 on CPU, else XLA's dot."""
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f'matmul takes 2-D operands, found shapes {a.shape} and {b.shape}')
    if a.shape[1] != b.shape[0]:
        raise ValueError(
            f'matmul contraction sizes differ: a {a.shape} has {a.shape[1]} columns, '
            f'b {b.shape} has {b.shape[0]} rows'
        )
    if a.dtype != jnp.float32 or b.dtype != jnp.float32 or not mkl_matmul_enabled():
        return a @ b
    return jax.lax.platform_dependent(a, b, cpu=_mkl_matmul, default=jnp.matmul)


def main() -> None:
    os.environ.setdefault(ENV_VAR, 'mkl')
    print(f'extension: {build_extension()}')
    print(f'MKL: {find_mkl_runtime()}')
    print(f'CPU matmul path: {"MKL custom call" if mkl_matmul_enabled() else "XLA"}')


if __name__ == '__main__':
    main()
