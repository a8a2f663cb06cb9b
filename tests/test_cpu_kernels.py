"""The CPU plug-in's custom calls (crossformer_jax/cpu/kernels.py): matmul, group attention,
LayerNorm, convolutions.

On x86-64 Linux the test extra installs MKL and CI machines have a C++ compiler, so the custom
calls must be available there: the tests fail (with the reason) rather than skip when they are not.
Elsewhere no MKL wheel exists and the module is skipped. Each kernel
is checked in float32 against its definition evaluated in float64.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import attention_inputs, needs_cpu_plugin, plain_group_attention

from crossformer_jax.cpu import kernels as cpu_kernels
from crossformer_jax.models import ops

pytestmark = needs_cpu_plugin


def require_mkl_kernels() -> None:
    try:
        cpu_kernels.load()
    except cpu_kernels.CpuKernelsUnavailable as error:
        pytest.fail(f'the MKL custom call is not available: {error}')
    assert cpu_kernels.kernels_loaded()


@pytest.fixture(autouse=True)
def loaded_kernels():
    """Every test here starts with the custom calls loaded (load is once per process)."""
    require_mkl_kernels()


def without_kernels(monkeypatch) -> None:
    """Makes `cpu_kernels` behave as before a successful `load`, for code traced afterwards."""
    monkeypatch.setattr(cpu_kernels, '_loaded', False)


# (M, K, N): row blocks, column blocks (N > M), one block, a long contraction, and sizes that do
# not divide into blocks evenly.
SHAPES = [(300, 40, 24), (20, 33, 700), (5, 7, 3), (6, 2000, 13), (129, 65, 64), (1, 1, 1)]


def on_cpu_of(monkeypatch, vendor: str) -> None:
    """Makes `cpu_kernels` see a CPU of this vendor, for code traced afterwards in the test."""
    monkeypatch.setattr(cpu_kernels, 'cpu_vendor', lambda cpuinfo='/proc/cpuinfo': vendor)


@pytest.mark.parametrize('shape', SHAPES)
def test_mkl_matmul_equals_the_float64_product(shape, monkeypatch):
    require_mkl_kernels()
    on_cpu_of(monkeypatch, 'GenuineIntel')
    m, k, n = shape
    rng = np.random.default_rng(m * k + n)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    product = jax.jit(cpu_kernels.matmul)
    found = np.asarray(product(a, b))
    want = a.astype(np.float64) @ b
    assert found.shape == (m, n) and found.dtype == np.float32
    np.testing.assert_allclose(found, want, rtol=1e-5, atol=1e-5 * np.sqrt(k))
    assert cpu_kernels.MATMUL_TARGET in product.lower(a, b).as_text()


def test_matmul_uses_xla_for_other_dtypes_and_when_switched_off(monkeypatch):
    a = jnp.ones((4, 3), jnp.bfloat16)
    b = jnp.ones((3, 2), jnp.bfloat16)
    assert cpu_kernels.MATMUL_TARGET not in jax.jit(cpu_kernels.matmul).lower(a, b).as_text()
    np.testing.assert_array_equal(cpu_kernels.matmul(a, b), np.full((4, 2), 3.0))

    without_kernels(monkeypatch)
    a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
    assert not cpu_kernels.mkl_matmul_enabled()
    hlo = jax.jit(cpu_kernels.matmul).lower(a32, b32).as_text()
    assert cpu_kernels.MATMUL_TARGET not in hlo


def test_matmul_is_xla_dot_off_intel(monkeypatch):
    require_mkl_kernels()
    a = np.arange(12, dtype=np.float32).reshape(4, 3)
    b = np.ones((3, 2), np.float32)
    for vendor in ('AuthenticAMD', ''):
        on_cpu_of(monkeypatch, vendor)
        assert not cpu_kernels.mkl_matmul_enabled()
        hlo = jax.jit(cpu_kernels.matmul).lower(a, b).as_text()
        assert cpu_kernels.MATMUL_TARGET not in hlo and 'dot' in hlo
        np.testing.assert_array_equal(cpu_kernels.matmul(a, b), a @ b)
    on_cpu_of(monkeypatch, 'GenuineIntel')
    assert cpu_kernels.mkl_matmul_enabled()


def test_cpu_vendor_reads_cpuinfo(tmp_path):
    cpuinfo = tmp_path / 'cpuinfo'
    cpuinfo.write_text('processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n')
    assert cpu_kernels.cpu_vendor(str(cpuinfo)) == 'AuthenticAMD'
    arm = tmp_path / 'arm'
    arm.write_text('processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\n')
    assert cpu_kernels.cpu_vendor(str(arm)) == ''
    assert cpu_kernels.cpu_vendor(str(tmp_path / 'missing')) == ''


def test_matmul_rejects_operands_that_do_not_fit():
    with pytest.raises(ValueError, match=r'2-D operands, found shapes \(2, 3, 4\) and \(4, 5\)'):
        cpu_kernels.matmul(jnp.ones((2, 3, 4)), jnp.ones((4, 5)))
    with pytest.raises(
        ValueError,
        match=r'contraction sizes differ: a \(2, 3\) has 3 columns, b \(4, 5\) has 4 rows',
    ):
        cpu_kernels.matmul(jnp.ones((2, 3)), jnp.ones((4, 5)))


def test_linear_uses_mkl_only_when_not_differentiated(monkeypatch):
    """Inference on an Intel CPU: `linear` through the custom call, against the float64 layer,
    also under vmap. Differentiated (a train step), every product is an XLA dot and the gradients
    match float64 autodiff."""
    require_mkl_kernels()
    on_cpu_of(monkeypatch, 'GenuineIntel')
    rng = np.random.default_rng(0)
    shapes = ((2, 3, 50, 16), (16, 24), (24,))
    args = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    cotangent = rng.standard_normal((2, 3, 50, 24)).astype(np.float32)
    with jax.enable_x64(True):
        args64 = [jnp.asarray(x, jnp.float64) for x in args]
        want_out, want_vjp = jax.vjp(lambda x, w, b: x @ w + b, *args64)
        wants = want_vjp(jnp.asarray(cotangent, jnp.float64))

    forward = jax.jit(cpu_kernels.linear)
    assert forward.lower(*args).as_text().count(cpu_kernels.MATMUL_TARGET) == 1
    np.testing.assert_allclose(forward(*args), want_out, rtol=1e-5, atol=2e-5)
    batched = jax.vmap(cpu_kernels.linear, in_axes=(0, None, None))(*args)
    np.testing.assert_allclose(batched, want_out, rtol=1e-5, atol=2e-5)

    outputs, vjp = jax.vjp(cpu_kernels.linear, *args)
    np.testing.assert_allclose(outputs, want_out, rtol=1e-5, atol=2e-5)
    for found, want in zip(vjp(cotangent), wants):
        assert found.shape == want.shape
        np.testing.assert_allclose(found, want, rtol=1e-5, atol=1e-4)
    loss = jax.value_and_grad(lambda *a: cpu_kernels.linear(*a).sum(), argnums=(0, 1, 2))
    assert cpu_kernels.MATMUL_TARGET not in jax.jit(loss).lower(*args).as_text()


def test_build_reuses_the_cached_library_and_reports_a_missing_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv(cpu_kernels.CACHE_ENV_VAR, str(tmp_path))
    library = cpu_kernels.build_extension()
    assert library.parent == tmp_path and library.suffix == '.so'
    built = library.stat().st_mtime_ns
    assert cpu_kernels.build_extension() == library
    assert library.stat().st_mtime_ns == built
    assert [p.name for p in tmp_path.iterdir()] == [library.name]  # no partial file left

    monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))
    with pytest.raises(cpu_kernels.CpuKernelsUnavailable, match='no C\\+\\+ compiler .*no-such'):
        cpu_kernels.build_extension()
    monkeypatch.setenv('CXX', 'false')  # a "compiler" that fails
    with pytest.raises(cpu_kernels.CpuKernelsUnavailable, match='compiling .*kernels.cc failed'):
        cpu_kernels.build_extension()
    assert [p.name for p in tmp_path.iterdir()] == [library.name]


def float64_vjp(function, args, cotangent):
    """(outputs, input cotangents) of function at args, in float64."""
    with jax.enable_x64(True):
        args = [jnp.asarray(a, jnp.float64) for a in args]
        out, vjp = jax.vjp(function, *args)
        return np.asarray(out), [np.asarray(g) for g in vjp(jnp.asarray(cotangent, jnp.float64))]


# (groups, tokens, heads, head_dim, key-bias groups, dropout): one head, several heads over
# uneven task splits, a 7x7 group with masked keys and dropout, a single group.
ATTENTION_CASES = [(4, 6, 1, 8, 1, False), (15, 9, 3, 4, 5, False), (12, 49, 2, 16, 3, True)]


@pytest.mark.parametrize('case', ATTENTION_CASES)
def test_attention_kernels_equal_the_float64_formula(case):
    """The forward and backward custom calls against plain JAX autodiff in float64: output,
    d_qkv and the position bias gradient (summed over groups), with masked keys (-1e6) and a
    dropout keep multiplier where given."""
    require_mkl_kernels()
    groups, tokens, heads, head_dim, key_groups, dropout = case
    rng = np.random.default_rng(groups)
    qkv, position_bias, key_bias, keep = (
        np.asarray(a, np.float32)
        for a in attention_inputs(rng, groups, tokens, heads, head_dim, key_groups)
    )
    keep = keep if dropout else None
    cotangent = rng.standard_normal((groups, tokens, heads * head_dim)).astype(np.float32)

    def attention(function, qkv, position_bias):
        return function(qkv, position_bias, key_bias, keep, heads)

    want_out, want_grads = float64_vjp(
        functools.partial(attention, plain_group_attention), (qkv, position_bias), cotangent
    )
    kernel = functools.partial(attention, cpu_kernels.group_attention)
    forward = jax.jit(kernel)
    assert cpu_kernels.ATTENTION_FORWARD in forward.lower(qkv, position_bias).as_text()
    np.testing.assert_allclose(forward(qkv, position_bias), want_out, rtol=1e-5, atol=1e-5)

    backward = jax.jit(lambda *args: jax.vjp(kernel, *args)[1](cotangent))
    assert cpu_kernels.ATTENTION_BACKWARD in backward.lower(qkv, position_bias).as_text()
    for found, want in zip(backward(qkv, position_bias), want_grads):
        assert found.shape == want.shape and found.dtype == np.float32
        np.testing.assert_allclose(found, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_attention_kernel_rejects_bad_operands():
    qkv = jnp.ones((6, 5, 12))
    bias = jnp.zeros((2, 5, 5))
    with pytest.raises(ValueError, match=r'qkv must be \(B, T, 3C\).*5 heads.*\(6, 5, 12\)'):
        cpu_kernels.group_attention(qkv, jnp.zeros((5, 5, 5)), None, None, 5)
    with pytest.raises(ValueError, match=r'position_bias must be .*\(2, 5, 5\), found \(2, 5, 4\)'):
        cpu_kernels.group_attention(qkv, jnp.zeros((2, 5, 4)), None, None, 2)
    with pytest.raises(ValueError, match=r'key_bias must be \(G, 5\) with G dividing B = 6'):
        cpu_kernels.group_attention(qkv, bias, np.zeros((4, 5), np.float32), None, 2)
    with pytest.raises(ValueError, match=r'keep must be .*\(6, 2, 5, 5\), found \(6, 2, 5\)'):
        jax.grad(
            lambda q: cpu_kernels.group_attention(q, bias, None, jnp.ones((6, 2, 5)), 2).sum()
        )(qkv)


@pytest.mark.parametrize('shape', [(3, 7), (2, 700, 96), (1000, 5)])
def test_layer_norm_kernels_equal_the_float64_formula(shape):
    """LayerNorm forward and backward custom calls against float64 autodiff of the textbook
    formula: one task, several tasks with a short last one, and a narrow row."""
    require_mkl_kernels()
    rng = np.random.default_rng(len(shape))
    c = shape[-1]
    x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(np.float32)  # off-centre rows
    scale = (1.0 + 0.3 * rng.standard_normal(c)).astype(np.float32)
    bias = (0.3 * rng.standard_normal(c)).astype(np.float32)
    cotangent = rng.standard_normal(shape).astype(np.float32)

    def textbook(x, scale, bias):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / jnp.sqrt(var + 1e-5) * scale + bias

    want_out, want_grads = float64_vjp(textbook, (x, scale, bias), cotangent)
    kernel = functools.partial(cpu_kernels.layer_norm, eps=1e-5)
    forward = jax.jit(kernel)
    assert cpu_kernels.LAYER_NORM_FORWARD in forward.lower(x, scale, bias).as_text()
    np.testing.assert_allclose(forward(x, scale, bias), want_out, rtol=1e-5, atol=1e-5)
    backward = jax.jit(lambda *args: jax.vjp(kernel, *args)[1](cotangent))
    assert cpu_kernels.LAYER_NORM_BACKWARD in backward.lower(x, scale, bias).as_text()
    for found, want in zip(backward(x, scale, bias), want_grads):
        assert found.shape == want.shape
        np.testing.assert_allclose(found, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_layer_norm_rejects_bad_operands_and_uses_xla_when_switched_off(monkeypatch):
    with pytest.raises(ValueError, match=r'scale, bias \(C,\); found x \(2, 4\), scale \(3,\)'):
        cpu_kernels.layer_norm(jnp.ones((2, 4)), jnp.ones(3), jnp.ones(4), 1e-5)
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    args = (x, np.ones(8, np.float32), np.zeros(8, np.float32))
    loss = jax.jit(jax.grad(lambda *a: cpu_kernels.layer_norm(*a, 1e-5).sum() ** 2))
    with_kernels = loss(*args)
    without_kernels(monkeypatch)
    hlo = jax.jit(jax.grad(lambda *a: cpu_kernels.layer_norm(*a, 1e-5).sum() ** 2)).lower(*args)
    assert 'crossformer_' not in hlo.as_text()
    np.testing.assert_allclose(
        jax.grad(lambda *a: cpu_kernels.layer_norm(*a, 1e-5).sum() ** 2)(*args),
        with_kernels,
        rtol=1e-5,
        atol=1e-5,
    )


# (x shape, features, kernel, stride, padding). Block products (< 64 features, kernel m >= 2
# strides): a merge-like k = 2s, the stride-4 embeddings with 3 input channels, clipped blocks,
# one image (its output rows split between the threads) over several tiles of block rows, and
# m = 3. Patch products: a kernel of one stride (m = 1, no padding) and wide outputs (>= 64
# features) with short and long patches, over two 128-pixel tiles with a partial last one.
CONV_CASES = [
    ((2, 12, 10, 8), 6, 4, 2, 1),
    ((1, 32, 32, 3), 5, 8, 4, 2),
    ((1, 32, 28, 3), 4, 16, 4, 6),
    ((2, 40, 36, 3), 12, 32, 4, 14),
    ((1, 100, 60, 3), 8, 16, 4, 6),
    ((3, 13, 9, 5), 7, 6, 2, 2),
    ((2, 9, 9, 4), 3, 3, 3, 0),
    ((1, 10, 10, 16), 64, 4, 2, 1),
    ((2, 9, 9, 40), 70, 4, 2, 1),
    ((2, 24, 20, 8), 64, 4, 2, 1),
]


@pytest.mark.parametrize('case', CONV_CASES)
def test_conv_kernels_equal_the_float64_convolution(case):
    """The convolution and its kernel gradient against XLA's convolution and its autodiff in
    float64."""
    require_mkl_kernels()
    shape, features, k, stride, padding = case
    rng = np.random.default_rng(k * stride + padding)
    x = rng.standard_normal(shape).astype(np.float32)
    kernel = (0.1 * rng.standard_normal((k, k, shape[-1], features))).astype(np.float32)
    with jax.enable_x64(True):
        x64, kernel64 = jnp.asarray(x, jnp.float64), jnp.asarray(kernel, jnp.float64)
        want_out, vjp = jax.vjp(lambda w: ops.strided_conv(x64, w, stride, padding), kernel64)
        cotangent = rng.standard_normal(want_out.shape)
        (want_grad,) = vjp(jnp.asarray(cotangent))
        want_out, want_grad = np.asarray(want_out), np.asarray(want_grad)
    cotangent = cotangent.astype(np.float32)

    forward = jax.jit(functools.partial(cpu_kernels.conv, stride=stride, padding=padding))
    assert cpu_kernels.CONV_FORWARD in forward.lower(x, kernel).as_text()
    np.testing.assert_allclose(forward(x, kernel), want_out, rtol=1e-5, atol=1e-5)
    gradient = jax.jit(
        functools.partial(
            cpu_kernels.conv_kernel_gradient, kernel_size=k, stride=stride, padding=padding
        )
    )
    assert cpu_kernels.CONV_KERNEL_GRADIENT in gradient.lower(x, cotangent).as_text()
    found = gradient(x, cotangent)
    assert found.shape == kernel.shape
    np.testing.assert_allclose(found, want_grad, rtol=1e-4, atol=1e-5 * np.abs(want_grad).max())


def test_conv_rejects_bad_operands():
    with pytest.raises(ValueError, match=r'kernel \(k, k, Cin, Cout\), found \(1, 8, 8, 3\) and'):
        cpu_kernels.conv(jnp.ones((1, 8, 8, 3)), jnp.ones((4, 4, 2, 5)), 2, 1)
    with pytest.raises(ValueError, match=r'grad \(1, 3, 3, 5\) does not fit x \(1, 8, 8, 3\)'):
        cpu_kernels.conv_kernel_gradient(jnp.ones((1, 8, 8, 3)), jnp.ones((1, 3, 3, 5)), 4, 2, 1)


def test_conv_kernels_take_an_empty_batch():
    require_mkl_kernels()
    x = np.zeros((0, 8, 8, 3), np.float32)
    kernel = np.ones((4, 4, 3, 5), np.float32)
    out = jax.jit(functools.partial(cpu_kernels.conv, stride=2, padding=1))(x, kernel)
    assert out.shape == (0, 4, 4, 5)
    gradient = cpu_kernels.conv_kernel_gradient(x, np.zeros((0, 4, 4, 5), np.float32), 4, 2, 1)
    np.testing.assert_array_equal(gradient, np.zeros((4, 4, 3, 5)))


def test_main_reports_the_paths_in_use(capsys, monkeypatch):
    require_mkl_kernels()
    for vendor, matmuls in (('GenuineIntel', 'MKL'), ('AuthenticAMD', 'XLA dots')):
        on_cpu_of(monkeypatch, vendor)
        cpu_kernels.main()
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == f'extension: {cpu_kernels.build_extension()}'
        assert lines[2:] == [f'inference matmuls: {matmuls} (CPU: {vendor})']
