"""The MKL matmul custom call (crossformer_jax/cpu_matmul.py).

The test extra installs MKL and CI machines have a C++ compiler, so the custom call must be
available here: the tests fail (with the reason) rather than skip when it is not.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import cpu_matmul_choice

from crossformer_jax import cpu_matmul
from crossformer_jax import crossformer as flax_crossformer


def require_mkl_matmul() -> None:
    try:
        cpu_matmul._load()
    except cpu_matmul.CpuMatmulUnavailable as error:
        pytest.fail(f'the MKL custom call is not available: {error}')
    assert cpu_matmul.mkl_matmul_enabled()


# (M, K, N): row blocks, column blocks (N > M), one block, a long contraction, and sizes that do
# not divide into blocks evenly.
SHAPES = [(300, 40, 24), (20, 33, 700), (5, 7, 3), (6, 2000, 13), (129, 65, 64), (1, 1, 1)]


@pytest.mark.parametrize('shape', SHAPES)
def test_mkl_matmul_equals_the_float64_product(shape):
    require_mkl_matmul()
    m, k, n = shape
    rng = np.random.default_rng(m * k + n)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    product = jax.jit(cpu_matmul.matmul)
    found = np.asarray(product(a, b))
    want = a.astype(np.float64) @ b
    assert found.shape == (m, n) and found.dtype == np.float32
    np.testing.assert_allclose(found, want, rtol=1e-5, atol=1e-5 * np.sqrt(k))
    assert cpu_matmul.TARGET_NAME in product.lower(a, b).as_text()


def test_matmul_uses_xla_for_other_dtypes_and_when_switched_off(monkeypatch):
    a = jnp.ones((4, 3), jnp.bfloat16)
    b = jnp.ones((3, 2), jnp.bfloat16)
    assert cpu_matmul.TARGET_NAME not in jax.jit(cpu_matmul.matmul).lower(a, b).as_text()
    np.testing.assert_array_equal(cpu_matmul.matmul(a, b), np.full((4, 2), 3.0))

    with cpu_matmul_choice(monkeypatch, 'xla'):
        a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
        assert not cpu_matmul.mkl_matmul_enabled()
        hlo = jax.jit(cpu_matmul.matmul).lower(a32, b32).as_text()
        assert cpu_matmul.TARGET_NAME not in hlo
    with (
        cpu_matmul_choice(monkeypatch, 'fast'),
        pytest.raises(ValueError, match=r"must be auto, mkl or xla, found 'fast'"),
    ):
        cpu_matmul.mkl_matmul_enabled()


def test_matmul_rejects_operands_that_do_not_fit():
    with pytest.raises(ValueError, match=r'2-D operands, found shapes \(2, 3, 4\) and \(4, 5\)'):
        cpu_matmul.matmul(jnp.ones((2, 3, 4)), jnp.ones((4, 5)))
    with pytest.raises(
        ValueError,
        match=r'contraction sizes differ: a \(2, 3\) has 3 columns, b \(4, 5\) has 4 rows',
    ):
        cpu_matmul.matmul(jnp.ones((2, 3)), jnp.ones((4, 5)))


def test_linear_uses_mkl_only_when_not_differentiated():
    """Inference: `linear` through the custom call, against the float64 layer, also under vmap.
    Differentiated (a train step), every product is an XLA dot and the gradients match float64
    autodiff."""
    require_mkl_matmul()
    rng = np.random.default_rng(0)
    shapes = ((2, 3, 50, 16), (16, 24), (24,))
    args = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    cotangent = rng.standard_normal((2, 3, 50, 24)).astype(np.float32)
    with jax.enable_x64(True):
        args64 = [jnp.asarray(x, jnp.float64) for x in args]
        want_out, want_vjp = jax.vjp(lambda x, w, b: x @ w + b, *args64)
        wants = want_vjp(jnp.asarray(cotangent, jnp.float64))

    forward = jax.jit(flax_crossformer.linear)
    assert forward.lower(*args).as_text().count(cpu_matmul.TARGET_NAME) == 1
    np.testing.assert_allclose(forward(*args), want_out, rtol=1e-5, atol=2e-5)
    batched = jax.vmap(flax_crossformer.linear, in_axes=(0, None, None))(*args)
    np.testing.assert_allclose(batched, want_out, rtol=1e-5, atol=2e-5)

    outputs, vjp = jax.vjp(flax_crossformer.linear, *args)
    np.testing.assert_allclose(outputs, want_out, rtol=1e-5, atol=2e-5)
    for found, want in zip(vjp(cotangent), wants):
        assert found.shape == want.shape
        np.testing.assert_allclose(found, want, rtol=1e-5, atol=1e-4)
    loss = jax.value_and_grad(lambda *a: flax_crossformer.linear(*a).sum(), argnums=(0, 1, 2))
    assert cpu_matmul.TARGET_NAME not in jax.jit(loss).lower(*args).as_text()


def test_build_reuses_the_cached_library_and_reports_a_missing_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv(cpu_matmul.CACHE_ENV_VAR, str(tmp_path))
    library = cpu_matmul.build_extension()
    assert library.parent == tmp_path and library.suffix == '.so'
    built = library.stat().st_mtime_ns
    assert cpu_matmul.build_extension() == library
    assert library.stat().st_mtime_ns == built
    assert [p.name for p in tmp_path.iterdir()] == [library.name]  # no partial file left

    monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))
    with pytest.raises(cpu_matmul.CpuMatmulUnavailable, match='no C\\+\\+ compiler .*no-such'):
        cpu_matmul.build_extension()
    monkeypatch.setenv('CXX', 'false')  # a "compiler" that fails
    with pytest.raises(cpu_matmul.CpuMatmulUnavailable, match='compiling cpu_matmul.cc failed'):
        cpu_matmul.build_extension()
    assert [p.name for p in tmp_path.iterdir()] == [library.name]
