"""CrossFormer's float32 kernels for XLA:CPU: MKL and hand-written loops as XLA FFI custom calls.

- `matmul`: a @ b with MKL's single-threaded cblas_sgemm on blocks of output rows (or columns)
  shared out over XLA's own intra-op thread pool, so no second thread pool competes with XLA's.
  On Intel CPUs XLA:CPU's products run CrossFormer's dense layers slower than MKL; elsewhere MKL
  takes its generic path and `matmul` stays XLA's dot. `linear` uses it when it is not
  differentiated (inference); differentiated, its products stay XLA dots, which XLA fuses with the
  elementwise work around them, and its kernel gradient is one 2-D product over all tokens.
- `group_attention`: softmax attention inside groups, forward and backward, one (group, head)
  pair at a time, reading q, k, v from the qkv layer's output in place (no head-major transposes).
- `layer_norm`: LayerNorm forward and backward in one pass over each row.
- `strided_conv`: the convolutions of the cross-scale embeddings. A kernel equal to its stride is
  space-to-depth plus one product; the others are custom calls (MKL products over tiles of
  gathered patches or, for few output channels, over stride x stride blocks of the input), with
  the input gradient computed by output phases and the kernel gradient by `conv_kernel_gradient`.

Each falls back to XLA formulas for other dtypes, on other platforms (`jax.lax.platform_dependent`)
and before `load()` has succeeded; the tests check one against the other. These are the
primitives of `crossformer_jax.models.ops` for a CPU run, installed by `crossformer_jax.cpu.enable`.

The custom calls are kernels.cc, compiled with the C++ compiler (`$CXX`, else `c++`) against the
FFI headers that jaxlib ships, once per source and jaxlib version, into `$CROSSFORMER_JAX_CACHE`
(default `~/.cache/crossformer_jax`). MKL is the `mkl` package from PyPI
(`pip install 'crossformer_jax[cpu]'`), loaded with its sequential threading layer.
`python -m crossformer_jax.cpu.kernels` builds the extension and says which path is used.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from crossformer_jax.models import ops

CACHE_ENV_VAR = 'CROSSFORMER_JAX_CACHE'
MATMUL_TARGET = 'crossformer_matmul'
ATTENTION_FORWARD = 'crossformer_attention_forward'
ATTENTION_BACKWARD = 'crossformer_attention_backward'
LAYER_NORM_FORWARD = 'crossformer_layer_norm_forward'
LAYER_NORM_BACKWARD = 'crossformer_layer_norm_backward'
CONV_FORWARD = 'crossformer_conv_forward'
CONV_KERNEL_GRADIENT = 'crossformer_conv_kernel_gradient'
SOURCE = Path(__file__).with_name('kernels.cc')
MKL_SEQUENTIAL = 1  # MKL_Set_Threading_Layer's code for the sequential layer


class CpuKernelsUnavailable(RuntimeError):
    """The custom calls cannot be used here (no MKL, no compiler, or the build failed)."""


def find_mkl_runtime() -> Path:
    """Path of libmkl_rt from the installed `mkl` distribution."""
    try:
        files = importlib.metadata.distribution('mkl').files or []
    except importlib.metadata.PackageNotFoundError as error:
        raise CpuKernelsUnavailable(
            "MKL is not installed: pip install 'crossformer_jax[cpu]' (the `mkl` package)"
        ) from error
    for file in files:
        if file.name.startswith('libmkl_rt.so'):
            return Path(file.locate()).resolve()
    raise CpuKernelsUnavailable('the installed `mkl` package has no libmkl_rt.so')


def cache_dir() -> Path:
    default = Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / 'crossformer_jax'
    return Path(os.environ.get(CACHE_ENV_VAR, default))


def build_extension(source_file: Path = SOURCE) -> Path:
    """Compiles kernels.cc, or another version of it (benchmarks/conv_benchmark.py), once per
    source, jaxlib version and compiler, and returns the .so.

    The library is written to a temporary name and renamed into place, so processes that build at
    the same time never load a partial file.
    """
    compiler = os.environ.get('CXX', 'c++')
    source = source_file.read_bytes()
    key = hashlib.sha256(source + jaxlib.__version__.encode() + compiler.encode()).hexdigest()
    library = cache_dir() / f'cpu_kernels-{key[:16]}.so'
    if library.exists():
        return library
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=library.parent, suffix='.so', delete=False) as handle:
            partial = Path(handle.name)
    except OSError as error:
        raise CpuKernelsUnavailable(
            f'cannot write the extension to {library.parent} ({error}); set ${CACHE_ENV_VAR}'
        ) from error
    command = [
        compiler,
        '-O3',
        '-fopenmp-simd',
        '-std=c++17',
        '-shared',
        '-fPIC',
        '-w',
        f'-I{jax.ffi.include_dir()}',
        str(source_file),
        '-o',
        str(partial),
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise CpuKernelsUnavailable(f'no C++ compiler {compiler!r} ({error}); set $CXX') from error
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise CpuKernelsUnavailable(
            f'compiling {source_file} failed ({" ".join(command)}):\n{result.stderr[-2000:]}'
        )
    os.replace(partial, library)
    return library


@functools.cache
def _mkl() -> ctypes.CDLL:
    mkl = ctypes.CDLL(str(find_mkl_runtime()))
    mkl.MKL_Set_Threading_Layer.restype = ctypes.c_int
    mkl.MKL_Set_Threading_Layer(MKL_SEQUENTIAL)  # threads are XLA's; before MKL's first call
    return mkl


def register_extension(library: Path, suffix: str = '') -> None:
    """Loads a built extension, hands it MKL's functions and registers its FFI targets, each under
    its name + suffix (a suffix lets a second version sit beside the first, for benchmarks)."""
    mkl = _mkl()
    extension = ctypes.CDLL(str(library))
    extension.crossformer_set_mkl(
        ctypes.cast(mkl.cblas_sgemm, ctypes.c_void_p), ctypes.cast(mkl.vsExp, ctypes.c_void_p)
    )
    for target, handler in (
        (MATMUL_TARGET, extension.CrossformerMatmul),
        (ATTENTION_FORWARD, extension.CrossformerAttentionForward),
        (ATTENTION_BACKWARD, extension.CrossformerAttentionBackward),
        (LAYER_NORM_FORWARD, extension.CrossformerLayerNormForward),
        (LAYER_NORM_BACKWARD, extension.CrossformerLayerNormBackward),
        (CONV_FORWARD, extension.CrossformerConvForward),
        (CONV_KERNEL_GRADIENT, extension.CrossformerConvKernelGradient),
    ):
        jax.ffi.register_ffi_target(target + suffix, jax.ffi.pycapsule(handler), platform='cpu')


_loaded = False


def load() -> None:
    """Builds (or finds) the extension, loads MKL and registers the FFI targets, once; raises
    CpuKernelsUnavailable when MKL, the compiler or the cache directory is missing."""
    global _loaded
    if not _loaded:
        register_extension(build_extension())
        _loaded = True


def kernels_loaded() -> bool:
    """Whether float32 work on CPU uses the custom calls (`load` has succeeded)."""
    return _loaded


@functools.cache
def cpu_vendor(cpuinfo: str = '/proc/cpuinfo') -> str:
    """The CPU vendor ('GenuineIntel', 'AuthenticAMD', ...) from `cpuinfo`'s vendor_id line, or ''
    where there is none (not Linux, not x86)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(':')
                if key.strip() == 'vendor_id':
                    return value.strip()
    except OSError:
        pass
    return ''


def mkl_matmul_enabled() -> bool:
    """Whether `matmul` runs float32 products on MKL: the custom calls are loaded and the CPU is
    Intel's (elsewhere MKL takes its generic code path; benchmarks/README.md, "MKL matmuls off
    Intel")."""
    return kernels_loaded() and cpu_vendor() == 'GenuineIntel'


def _mkl_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    call = jax.ffi.ffi_call(
        MATMUL_TARGET,
        jax.ShapeDtypeStruct((a.shape[0], b.shape[1]), jnp.float32),
        vmap_method='sequential',
    )
    return call(a, b)


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """a (M, K) @ b (K, N) -> (M, N): the MKL custom call for float32 on an Intel CPU
    (`mkl_matmul_enabled`), else XLA's dot."""
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


def _check_attention_operands(qkv, position_bias, key_bias, keep, num_heads) -> None:
    if qkv.ndim != 3 or qkv.shape[2] % 3 or (qkv.shape[2] // 3) % num_heads:
        raise ValueError(
            f'group_attention: qkv must be (B, T, 3C) with C divisible by {num_heads} heads, '
            f'found shape {qkv.shape}'
        )
    b, t, _ = qkv.shape
    if position_bias.shape != (num_heads, t, t):
        raise ValueError(
            f'group_attention: position_bias must be (heads, T, T) = {(num_heads, t, t)}, '
            f'found {position_bias.shape}'
        )
    if key_bias is not None and (
        key_bias.ndim != 2 or key_bias.shape[1] != t or b % key_bias.shape[0]
    ):
        raise ValueError(
            f'group_attention: key_bias must be (G, {t}) with G dividing B = {b}, '
            f'found {key_bias.shape}'
        )
    if keep is not None and keep.shape != (b, num_heads, t, t):
        raise ValueError(
            f'group_attention: keep must be (B, heads, T, T) = {(b, num_heads, t, t)}, '
            f'found {keep.shape}'
        )


def _xla_attention_forward(qkv, position_bias, key_bias, keep, num_heads):
    """XLA's version of the forward custom call: (out (B, T, C), probs (B, heads, T, T))."""
    b, t, c3 = qkv.shape
    q, k, v = ops.split_heads(qkv.reshape(b, t, 3, c3 // 3), num_heads)
    probs = ops.attention_probabilities(q, k, position_bias, key_bias)
    weights = (probs if keep is None else probs * keep).astype(qkv.dtype)
    out = jnp.einsum('bhqk,bhkd->bqhd', weights, v)
    return out.reshape(b, t, c3 // 3), probs


def _xla_attention_backward(qkv, probs, keep, grad, num_heads):
    """XLA's version of the backward custom call: (d_qkv (B, T, 3C), d_position_bias)."""
    b, t, c3 = qkv.shape
    q, k, v = ops.split_heads(qkv.reshape(b, t, 3, c3 // 3), num_heads)
    (g,) = ops.split_heads(grad.reshape(b, t, 1, c3 // 3), num_heads)
    scale = (c3 // 3 // num_heads) ** -0.5
    weights = (probs if keep is None else probs * keep).astype(qkv.dtype)
    d_v = jnp.einsum('bhqk,bhqd->bhkd', weights, g)
    d_probs = jnp.einsum('bhqd,bhkd->bhqk', g, v).astype(probs.dtype)
    if keep is not None:
        d_probs = d_probs * keep
    # y * (g - sum(g * y)) from the saved softmax: autodiff's gradient goes back through the
    # division, for which XLA:CPU writes out the broadcast row sums at full attention size.
    d_logits = probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True))
    d_position_bias = jnp.sum(d_logits, axis=0)
    d_logits = d_logits.astype(qkv.dtype)
    d_q = jnp.einsum('bhqk,bhkd->bhqd', d_logits, k) * scale
    d_k = jnp.einsum('bhqk,bhqd->bhkd', d_logits, q) * scale
    # One transpose of the stacked cotangents back to the (B, T, 3, heads, hd) layout.
    d_qkv = jnp.transpose(jnp.stack([d_q, d_k, d_v]), (1, 3, 0, 2, 4))
    return d_qkv.reshape(b, t, c3), d_position_bias


def _use_kernels(x: jax.Array) -> bool:
    return x.dtype == jnp.float32 and kernels_loaded()


def _keep_operand(keep) -> jax.Array:
    """The custom calls' keep operand: an empty array for no dropout."""
    return jnp.zeros((0,), jnp.float32) if keep is None else keep.astype(jnp.float32)


def _attention_forward(qkv, position_bias, key_bias, keep, num_heads, save_probs):
    def xla(qkv, position_bias):
        out, probs = _xla_attention_forward(qkv, position_bias, key_bias, keep, num_heads)
        return (out, probs) if save_probs else (out,)

    if not _use_kernels(qkv):
        return xla(qkv, position_bias)
    b, t, c3 = qkv.shape
    probs_shape = (b, num_heads, t, t) if save_probs else (0,)
    # The custom call takes zeros for no key bias and the probs result empty when not saved.
    kernel_key_bias = jnp.zeros((1, t)) if key_bias is None else key_bias

    def kernel(qkv, position_bias):
        out, probs = jax.ffi.ffi_call(
            ATTENTION_FORWARD,
            (
                jax.ShapeDtypeStruct((b, t, c3 // 3), jnp.float32),
                jax.ShapeDtypeStruct(probs_shape, jnp.float32),
            ),
            vmap_method='sequential',
        )(
            qkv,
            position_bias,
            jnp.asarray(kernel_key_bias, jnp.float32),
            _keep_operand(keep),
            scale=np.float32((c3 // 3 // num_heads) ** -0.5),
            heads=np.int64(num_heads),
        )
        return (out, probs) if save_probs else (out,)

    return jax.lax.platform_dependent(qkv, position_bias, cpu=kernel, default=xla)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def group_attention(qkv, position_bias, key_bias, keep, num_heads: int) -> jax.Array:
    """Multi-head softmax attention inside groups of T tokens.

    qkv (B, T, 3C): each token's query, key and value, each C = heads * hd channels, head-major
    (a qkv layer's output); position_bias (heads, T, T) is added to the scaled logits, key_bias
    (G, T) or None to the logits of group b's keys as key_bias[b % G]; keep (B, heads, T, T) or
    None multiplies the softmax (dropout). Returns (B, T, C), heads concatenated.

    For float32 on CPU both passes are custom calls (MKL products, one (group, head) at a time);
    everywhere else XLA computes the same formulas.
    """
    _check_attention_operands(qkv, position_bias, key_bias, keep, num_heads)
    return _attention_forward(qkv, position_bias, key_bias, keep, num_heads, save_probs=False)[0]


def _group_attention_fwd(qkv, position_bias, key_bias, keep, num_heads):
    _check_attention_operands(qkv, position_bias, key_bias, keep, num_heads)
    out, probs = _attention_forward(qkv, position_bias, key_bias, keep, num_heads, True)
    return out, (qkv, probs, keep)


def _group_attention_bwd(num_heads, residuals, grad):
    qkv, probs, keep = residuals

    def xla(qkv, probs, grad):
        return _xla_attention_backward(qkv, probs, keep, grad, num_heads)

    def kernel(qkv, probs, grad):
        _, t, c3 = qkv.shape
        return jax.ffi.ffi_call(
            ATTENTION_BACKWARD,
            (
                jax.ShapeDtypeStruct(qkv.shape, jnp.float32),
                jax.ShapeDtypeStruct((num_heads, t, t), jnp.float32),
            ),
            vmap_method='sequential',
        )(
            qkv,
            probs,
            _keep_operand(keep),
            grad,
            scale=np.float32((c3 // 3 // num_heads) ** -0.5),
            heads=np.int64(num_heads),
        )

    if _use_kernels(qkv):
        d_qkv, d_position_bias = jax.lax.platform_dependent(
            qkv, probs, grad, cpu=kernel, default=xla
        )
    else:
        d_qkv, d_position_bias = xla(qkv, probs, grad)
    return d_qkv, d_position_bias, None, None


group_attention.defvjp(_group_attention_fwd, _group_attention_bwd)


def _xla_layer_norm_forward(x, scale, bias, eps):
    mean, rstd = ops.layer_norm_statistics(x, eps)
    return (x - mean) * rstd * scale + bias, mean[..., 0], rstd[..., 0]


def _xla_layer_norm_backward(x, mean, rstd, scale, grad):
    # The textbook LayerNorm gradient. XLA:CPU runs autodiff's version about 4x slower, as it
    # materialises several broadcasts of the row statistics.
    mean, rstd = mean[..., None], rstd[..., None]
    x_hat = (x - mean) * rstd
    grad_hat = grad * scale
    grad_x = rstd * (
        grad_hat
        - jnp.mean(grad_hat, axis=-1, keepdims=True)
        - x_hat * jnp.mean(grad_hat * x_hat, axis=-1, keepdims=True)
    )
    axes = tuple(range(x.ndim - 1))
    return grad_x, jnp.sum(grad * x_hat, axis=axes), jnp.sum(grad, axis=axes)


def _layer_norm_forward(x, scale, bias, eps):
    def xla(x, scale, bias):
        return _xla_layer_norm_forward(x, scale, bias, eps)

    def kernel(x, scale, bias):
        rows = x.shape[:-1]
        y, mean, rstd = jax.ffi.ffi_call(
            LAYER_NORM_FORWARD,
            (
                jax.ShapeDtypeStruct(x.shape, jnp.float32),
                jax.ShapeDtypeStruct(rows, jnp.float32),
                jax.ShapeDtypeStruct(rows, jnp.float32),
            ),
            vmap_method='sequential',
        )(x.reshape(-1, x.shape[-1]), scale, bias, eps=np.float32(eps))
        return y, mean, rstd

    if not _use_kernels(x):
        return xla(x, scale, bias)
    return jax.lax.platform_dependent(x, scale, bias, cpu=kernel, default=xla)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis of x (..., C) with scale and bias (C,), all of one dtype.

    For float32 on CPU both passes are custom calls (one pass over each row); everywhere else XLA
    computes the same formulas.
    """
    _check_layer_norm_operands(x, scale, bias)
    return _layer_norm_forward(x, scale, bias, eps)[0]


def _check_layer_norm_operands(x, scale, bias) -> None:
    if x.ndim == 0 or scale.shape != x.shape[-1:] or bias.shape != x.shape[-1:]:
        raise ValueError(
            f'layer_norm takes x (..., C) and scale, bias (C,); found x {x.shape}, '
            f'scale {scale.shape}, bias {bias.shape}'
        )


def _layer_norm_fwd(x, scale, bias, eps):
    _check_layer_norm_operands(x, scale, bias)
    y, mean, rstd = _layer_norm_forward(x, scale, bias, eps)
    return y, (x, mean, rstd, scale)


def _layer_norm_bwd(eps, residuals, grad):
    x, mean, rstd, scale = residuals

    def kernel(x, mean, rstd, scale, grad):
        c = x.shape[-1]
        d_x, d_scale, d_bias = jax.ffi.ffi_call(
            LAYER_NORM_BACKWARD,
            (
                jax.ShapeDtypeStruct(x.shape, jnp.float32),
                jax.ShapeDtypeStruct((c,), jnp.float32),
                jax.ShapeDtypeStruct((c,), jnp.float32),
            ),
            vmap_method='sequential',
        )(x.reshape(-1, c), mean, rstd, scale, grad.reshape(-1, c))
        return d_x, d_scale, d_bias

    if not _use_kernels(x):
        return _xla_layer_norm_backward(x, mean, rstd, scale, grad)
    return jax.lax.platform_dependent(
        x, mean, rstd, scale, grad, cpu=kernel, default=_xla_layer_norm_backward
    )


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def conv_output_shape(x_shape, kernel_size: int, features: int, stride: int, padding: int):
    n, h, w, _ = x_shape
    ho, wo = ((size + 2 * padding - kernel_size) // stride + 1 for size in (h, w))
    return n, ho, wo, features


def conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """x (N, H, W, Cin) convolved with kernel (k, k, Cin, Cout), zero padding on every side ->
    (N, Ho, Wo, Cout). On CPU in float32 a custom call (patches of 128 output pixels gathered
    into a buffer, then an MKL product; for Cout < 64 and k a multiple of the stride, products
    over stride x stride blocks of x), else XLA's convolution. Not differentiable by itself:
    `strided_conv` defines its gradient, with `conv_kernel_gradient`."""
    square_kernel = kernel.ndim == 4 and kernel.shape[0] == kernel.shape[1]
    if x.ndim != 4 or not square_kernel or x.shape[-1] != kernel.shape[2]:
        raise ValueError(
            f'conv takes x (N, H, W, Cin) and kernel (k, k, Cin, Cout), found {x.shape} and '
            f'{kernel.shape}'
        )
    k, _, _, cout = kernel.shape
    if not (_use_kernels(x) and kernel.dtype == jnp.float32):
        return ops.strided_conv(x, kernel, stride, padding)

    def custom_call(x, kernel):
        return jax.ffi.ffi_call(
            CONV_FORWARD,
            jax.ShapeDtypeStruct(conv_output_shape(x.shape, k, cout, stride, padding), x.dtype),
            vmap_method='sequential',
        )(x, kernel, stride=np.int64(stride), padding=np.int64(padding))

    return jax.lax.platform_dependent(
        x,
        kernel,
        cpu=custom_call,
        default=functools.partial(ops.strided_conv, stride=stride, padding=padding),
    )


def conv_kernel_gradient(
    x: jax.Array, grad: jax.Array, kernel_size: int, stride: int, padding: int
) -> jax.Array:
    """The gradient of `conv` with respect to its kernel: (k, k, Cin, Cout) from x (N, H, W, Cin)
    and the output's cotangent grad (N, Ho, Wo, Cout)."""
    shape = (kernel_size, kernel_size, x.shape[-1], grad.shape[-1])
    if grad.shape != conv_output_shape(x.shape, kernel_size, grad.shape[-1], stride, padding):
        raise ValueError(f'conv_kernel_gradient: grad {grad.shape} does not fit x {x.shape}')

    def xla(x, grad):
        zeros = jnp.zeros(shape, x.dtype)
        return jax.vjp(lambda kernel: ops.strided_conv(x, kernel, stride, padding), zeros)[1](grad)[
            0
        ]

    if not (_use_kernels(x) and grad.dtype == jnp.float32):
        return xla(x, grad)

    def custom_call(x, grad):
        return jax.ffi.ffi_call(
            CONV_KERNEL_GRADIENT, jax.ShapeDtypeStruct(shape, x.dtype), vmap_method='sequential'
        )(x, grad, stride=np.int64(stride), padding=np.int64(padding))

    return jax.lax.platform_dependent(x, grad, cpu=custom_call, default=xla)


@jax.custom_vjp
def linear(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """x (..., Cin) @ kernel (Cin, Cout) + bias (Cout,) -> (..., Cout).

    Not differentiated (inference), the product is `matmul` over all tokens: MKL on an Intel CPU,
    XLA's dot elsewhere.
    """
    x2 = x.reshape(-1, x.shape[-1])
    return (matmul(x2, kernel) + bias).reshape(*x.shape[:-1], kernel.shape[-1])


def _linear_fwd(x, kernel, bias):
    # Differentiated, the products stay XLA dots, which XLA fuses with the elementwise work around
    # them (benchmarks/README.md, "MKL matmuls through an XLA FFI custom call").
    return x @ kernel + bias, (x, kernel)


def _linear_bwd(residuals, grad):
    # The kernel gradient as one 2-D matmul over all tokens and the bias gradient as a column
    # sum; autodiff would give XLA:CPU the same products over N-D operands, which it runs slower
    # (benchmarks/README.md, "Profile on this Intel VM").
    x, kernel = residuals
    x2 = x.reshape(-1, x.shape[-1])
    grad2 = grad.reshape(-1, grad.shape[-1])
    d_kernel = jax.lax.dot_general(x2, grad2, (((0,), (0,)), ((), ())))
    return grad @ kernel.T, d_kernel, jnp.sum(grad2, axis=0)


linear.defvjp(_linear_fwd, _linear_bwd)


def patch_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A convolution whose kernel (k, k, Cin, Cout) equals its stride, without padding, as
    space-to-depth plus one product: x (N, H, W, Cin) -> (N, H/k, W/k, Cout)."""
    n, h, w, c = x.shape
    k, _, _, cout = kernel.shape
    x = x.reshape(n, h // k, k, w // k, k, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h // k, w // k, k * k * c) @ kernel.reshape(k * k * c, cout)


def strided_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """`crossformer_jax.models.ops.strided_conv` for the cross-scale embeddings (kernel k a multiple
    of the stride): `patch_conv` when k equals the stride, else `conv` with its gradient below."""
    if kernel.shape[0] == stride and padding == 0:
        return patch_conv(x, kernel)
    return _embedding_conv(x, kernel, stride, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _embedding_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    return conv(x, kernel, stride, padding)


def _strided_conv_fwd(x, kernel, stride, padding):
    return conv(x, kernel, stride, padding), (x, kernel)


def _strided_conv_bwd(stride, padding, residuals, grad):
    # Input gradient: with tap kh = stride * a + p, output row o writes to padded input row
    # stride * (o + a) + p. So one matmul grad @ kernel^T gives every tap's contribution, and the
    # k/stride shifted copies (one per a) summed and interleaved by phase p give the padded input
    # gradient. XLA:CPU would otherwise run a dilated convolution, several times slower.
    x, kernel = residuals
    n, h, w, cin = x.shape
    _n, ho, wo, cout = grad.shape
    k = kernel.shape[0]
    a = k // stride
    taps = grad.reshape(-1, cout) @ kernel.transpose(3, 0, 1, 2).reshape(cout, k * k * cin)
    taps = taps.reshape(n, ho, wo, a, stride, a, stride, cin)
    padded = sum(
        jnp.pad(
            taps[:, :, :, ah, :, aw], ((0, 0), (ah, a - 1 - ah), (aw, a - 1 - aw)) + ((0, 0),) * 3
        )
        for ah in range(a)
        for aw in range(a)
    )  # (N, Ho + a - 1, Wo + a - 1, stride, stride, Cin)
    padded = padded.transpose(0, 1, 3, 2, 4, 5)
    padded = padded.reshape(n, (ho + a - 1) * stride, (wo + a - 1) * stride, cin)
    grad_x = padded[:, padding : padding + h, padding : padding + w]
    return grad_x, conv_kernel_gradient(x, grad, k, stride, padding)


_embedding_conv.defvjp(_strided_conv_fwd, _strided_conv_bwd)


CPU_OPS = ops.Ops('cpu', layer_norm, linear, group_attention, strided_conv)


def main() -> None:
    load()
    print(f'extension: {build_extension()}')
    print(f'MKL: {find_mkl_runtime()}')
    vendor = cpu_vendor() or 'unknown'
    print(f'inference matmuls: {"MKL" if mkl_matmul_enabled() else "XLA dots"} (CPU: {vendor})')


if __name__ == '__main__':
    main()
