"""The CPU plug-in's `strided_conv` (custom calls, hand-written input gradient) equals autodiff of
the plain convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import needs_cpu_plugin

from crossformer_jax.cpu import kernels
from crossformer_jax.cpu.kernels import strided_conv
from crossformer_jax.models.ops import strided_conv as plain_conv

pytestmark = needs_cpu_plugin


@pytest.mark.parametrize(
    ('kernel_size', 'stride', 'height', 'width'), [(4, 2, 8, 12), (8, 4, 16, 8), (2, 2, 6, 4)]
)
def test_strided_conv_gradients_match_autodiff(kernel_size, stride, height, width):
    kernels.load()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, height, width, 3)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((kernel_size, kernel_size, 3, 5)), jnp.float32)
    padding = (kernel_size - stride) // 2

    def loss(conv_fn):
        return lambda x, kernel: jnp.sum(jnp.sin(conv_fn(x, kernel, stride, padding)))

    # Both sides are float32 sums in different orders (on CPU `strided_conv` runs the MKL
    # kernel): they agree to rounding, not bit for bit, and by how much depends on the CPU.
    ours = (
        strided_conv(x, kernel, stride, padding),
        *jax.grad(loss(strided_conv), (0, 1))(x, kernel),
    )
    reference = (
        plain_conv(x, kernel, stride, padding),
        *jax.grad(loss(plain_conv), (0, 1))(x, kernel),
    )
    for got, want in zip(ours, reference):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))
