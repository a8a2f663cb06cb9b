"""Gradient parity: the whole backward pass of the Flax model against PyTorch autograd on the
reference, parameter by parameter (float32, stochastic depth off), with the plain primitives and
with the CPU plug-in's, and `check_grads` in float64 on the plug-in's hand-written VJPs (LayerNorm,
group attention, the space-to-depth patch convolution, the dense layers' `linear`).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import PRIMITIVES, attention_inputs, plain_group_attention, primitives
from jax.test_util import check_grads

import crossformer_jax.models.crossformer as flax_crossformer
from crossformer_jax.cpu import kernels as cpu_kernels
from crossformer_jax.models import create_model, ops
from crossformer_jax.reference.crossformer import create_torch_model, randomize_parameters
from crossformer_jax.weights.convert import convert_torch_state_dict, flax_to_torch_state_dict

# Narrow models at 64x96: padded SDA windows, non-square LDA groups and padded small-map groups
# (v1); padded LDA regions and an ACL (++). Stages 2-3 are small maps (LDA = SDA there). Width 48
# makes the first DPB 3 wide: a LayerNorm over 2 features outputs +-1 and passes no gradient.
MODELS = {
    'v1': ('crossformer_tiny', dict(embed_dim=48, depths=(2, 2, 1, 1), num_heads=(1, 2, 4, 8))),
    'pp': ('crossformer_pp_small', dict(embed_dim=48, depths=(2, 1, 4, 1), num_heads=(1, 2, 4, 8))),
}
IMAGE_SIZE = (64, 96)
NUM_CLASSES = 10
# Float32 gradients agree to max|diff| <= 8e-7 * max|grad| over all parameters (measured on both
# models). Per-tensor maxima would not do: gradients that are zero in exact arithmetic (the last
# DPB bias shifts whole softmax rows) hold rounding noise only. 5e-6 leaves 6x headroom; a
# LayerNorm gradient without its x_hat term moves them by 0.17 (see
# test_planted_layer_norm_gradient_is_caught).
GRADIENT_TOLERANCE = 5e-6


@functools.cache
def reference_gradients(version):
    """(flax model, variables, images NHWC, loss weights, {torch name: gradient}) for one model.

    The loss is sum(logits * weights) with fixed random weights, so every logit has a gradient.
    """
    name, overrides = MODELS[version]
    overrides = dict(overrides, drop_path_rate=0.0)
    torch_model = create_torch_model(name, num_classes=NUM_CLASSES, **overrides)
    randomize_parameters(torch_model, seed=7).eval()
    variables = convert_torch_state_dict(
        torch_model.state_dict(), name, num_classes=NUM_CLASSES, **overrides
    )
    flax_model = create_model(name, num_classes=NUM_CLASSES, **overrides)
    rng = np.random.default_rng(8)
    images = rng.standard_normal((2, 3, *IMAGE_SIZE)).astype(np.float32)
    weights = rng.standard_normal((2, NUM_CLASSES)).astype(np.float32)

    torch_model.zero_grad()
    loss = (torch_model(torch.from_numpy(images)) * torch.from_numpy(weights)).sum()
    loss.backward()
    grads = {k: p.grad.numpy().copy() for k, p in torch_model.named_parameters()}
    return flax_model, variables, images.transpose(0, 2, 3, 1), weights, grads


def flax_gradients(version):
    """{torch name: gradient} of the same loss from jax.grad, in the PyTorch layout."""
    flax_model, variables, images, weights, _ = reference_gradients(version)

    def loss(params):
        return jnp.sum(flax_model.apply({'params': params}, images) * weights)

    # A fresh function per call: no trace is shared with another test (planted bugs included).
    grads = jax.jit(jax.grad(loss))(variables['params'])
    return flax_to_torch_state_dict({'params': grads})


def gradient_error(version):
    """max over parameters of max|flax - torch| / max over all gradients of |torch|."""
    expected = reference_gradients(version)[-1]
    found = flax_gradients(version)
    assert sorted(found) == sorted(expected)
    scale = max(float(np.max(np.abs(g))) for g in expected.values())
    errors = {}
    for key, grad in expected.items():
        assert found[key].shape == grad.shape, (key, found[key].shape, grad.shape)
        assert np.all(np.isfinite(found[key])), key
        errors[key] = float(np.max(np.abs(found[key] - grad))) / scale
    worst = max(errors, key=errors.get)
    print(
        f'[gradient parity] {version}: worst {worst} {errors[worst]:.2e} of max|grad| {scale:.3g}'
    )
    return errors


@pytest.mark.parametrize('kernels', PRIMITIVES)
@pytest.mark.parametrize('version', sorted(MODELS))
def test_gradients_match_torch(version, kernels):
    with primitives(kernels):
        errors = gradient_error(version)
    bad = {k: e for k, e in errors.items() if e > GRADIENT_TOLERANCE}
    assert not bad, bad
    # The floor constrains most gradients to 1% of their own size: they are far above it.
    expected = reference_gradients(version)[-1]
    scale = max(float(np.max(np.abs(g))) for g in expected.values())
    live = [k for k, g in expected.items() if np.max(np.abs(g)) > 100 * GRADIENT_TOLERANCE * scale]
    assert len(live) > 0.9 * len(expected), sorted(set(expected) - set(live))


def dropped_term_layer_norm_bwd(eps, residuals, grad):
    """The LayerNorm gradient without the x_hat * mean(grad_hat * x_hat) term (a planted bug)."""
    x, mean, rstd, scale = residuals
    mean, rstd = mean[..., None], rstd[..., None]
    x_hat = (x - mean) * rstd
    grad_hat = grad * scale
    grad_x = rstd * (grad_hat - jnp.mean(grad_hat, axis=-1, keepdims=True))
    axes = tuple(range(x.ndim - 1))
    return grad_x, jnp.sum(grad * x_hat, axis=axes), jnp.sum(grad, axis=axes)


def plant_wrong_layer_norm_gradient(monkeypatch):
    """Plants the wrong gradient in the plug-in's `layer_norm` and returns the plug-in's primitives
    with it."""
    wrong = jax.custom_vjp(
        lambda x, scale, bias, eps: cpu_kernels._layer_norm_fwd(x, scale, bias, eps)[0],
        nondiff_argnums=(3,),
    )
    wrong.defvjp(cpu_kernels._layer_norm_fwd, dropped_term_layer_norm_bwd)
    monkeypatch.setattr(cpu_kernels, 'layer_norm', wrong)
    return dataclasses.replace(cpu_kernels.CPU_OPS, layer_norm=wrong)


def layer_norm(x, scale, bias):
    return cpu_kernels.layer_norm(x, scale, bias, flax_crossformer.LAYER_NORM_EPS)


def test_planted_layer_norm_gradient_is_caught(monkeypatch):
    with ops.using(plant_wrong_layer_norm_gradient(monkeypatch)):
        errors = gradient_error('v1')
    assert max(errors.values()) > GRADIENT_TOLERANCE


# -------------------------------------------------------------------------------------------------
# check_grads (finite differences against the VJP) in float64.


def normalize_inputs(rng, rows=6, channels=5):
    x = 3.0 + 2.0 * rng.standard_normal((2, rows, channels))  # off-centre, not unit scale
    scale = 1.0 + 0.3 * rng.standard_normal(channels)
    bias = 0.3 * rng.standard_normal(channels)
    return tuple(jnp.asarray(a, jnp.float64) for a in (x, scale, bias))


def test_layer_norm_vjp_passes_check_grads():
    with jax.enable_x64(True):
        inputs = normalize_inputs(np.random.default_rng(0))
        check_grads(layer_norm, inputs, order=1, modes=['rev'])


def test_planted_layer_norm_vjp_fails_check_grads(monkeypatch):
    plant_wrong_layer_norm_gradient(monkeypatch)
    with jax.enable_x64(True):
        inputs = normalize_inputs(np.random.default_rng(0))
        with pytest.raises(AssertionError):
            check_grads(layer_norm, inputs, order=1, modes=['rev'])


@pytest.mark.parametrize('kernel', [2, 4])
def test_patch_conv_matches_convolution_and_passes_check_grads(kernel):
    """patch_conv (space-to-depth + matmul) = a stride-k, k x k convolution, values and grads."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(kernel)
        x = jnp.asarray(rng.standard_normal((2, 4 * kernel, 2 * kernel, 3)), jnp.float64)
        params = {
            'kernel': jnp.asarray(rng.standard_normal((kernel, kernel, 3, 5)), jnp.float64),
            'bias': jnp.asarray(rng.standard_normal(5), jnp.float64),
        }

        def patch_conv(x, kernel_weights, bias):
            return cpu_kernels.patch_conv(x, kernel_weights) + bias

        def convolution(x, kernel_weights, bias):
            out = jax.lax.conv_general_dilated(
                x,
                kernel_weights,
                (kernel, kernel),
                'VALID',
                dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
            )
            return out + bias

        args = (x, params['kernel'], params['bias'])
        np.testing.assert_allclose(patch_conv(*args), convolution(*args), rtol=1e-12, atol=1e-12)
        cotangent = jnp.asarray(rng.standard_normal(patch_conv(*args).shape), jnp.float64)
        grads = jax.vjp(patch_conv, *args)[1](cotangent)
        expected = jax.vjp(convolution, *args)[1](cotangent)
        for found, want in zip(grads, expected):
            np.testing.assert_allclose(found, want, rtol=1e-12, atol=1e-12)
        check_grads(patch_conv, args, order=1, modes=['rev'])


@pytest.mark.parametrize('options', ['plain', 'key_bias_and_dropout'])
def test_group_attention_equals_autodiff_of_the_plain_formula_and_passes_check_grads(options):
    """group_attention's formulas and hand-written VJP (softmax gradient from the saved output, one
    stacked transpose for d_qkv, the position bias gradient summed over groups) = plain JAX with
    autodiff, in float64 (the path other dtypes and accelerators take)."""
    with jax.enable_x64(True):
        inputs = attention_inputs(np.random.default_rng(0))
        qkv, position_bias, key_bias, keep = (jnp.asarray(a, jnp.float64) for a in inputs)
        if options == 'plain':
            key_bias = keep = None

        def attention(function, qkv, position_bias):
            return function(qkv, position_bias, key_bias, keep, 2)

        found = attention(cpu_kernels.group_attention, qkv, position_bias)
        want = attention(plain_group_attention, qkv, position_bias)
        np.testing.assert_allclose(found, want, rtol=1e-12, atol=1e-12)
        cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(want.shape))
        grads = jax.vjp(
            functools.partial(attention, cpu_kernels.group_attention), qkv, position_bias
        )
        expected = jax.vjp(functools.partial(attention, plain_group_attention), qkv, position_bias)
        for found, want in zip(grads[1](cotangent), expected[1](cotangent)):
            np.testing.assert_allclose(found, want, rtol=1e-10, atol=1e-12)
        check_grads(
            functools.partial(attention, cpu_kernels.group_attention),
            (qkv, position_bias),
            order=1,
            modes=['rev'],
        )


def test_linear_equals_autodiff_of_the_plain_product_and_passes_check_grads():
    """linear's hand-written VJP (2-D kernel gradient over all tokens, bias as a column sum) =
    autodiff of x @ kernel + bias on a 4-D activation."""

    def plain_linear(x, kernel, bias):
        return x @ kernel + bias

    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        args = tuple(
            jnp.asarray(rng.standard_normal(shape), jnp.float64)
            for shape in ((2, 3, 5, 4), (4, 6), (6,))  # N, groups, T, Cin; Cin, Cout; Cout
        )
        np.testing.assert_array_equal(cpu_kernels.linear(*args), plain_linear(*args))
        cotangent = jnp.asarray(rng.standard_normal((2, 3, 5, 6)), jnp.float64)
        found = jax.vjp(cpu_kernels.linear, *args)[1](cotangent)
        want = jax.vjp(plain_linear, *args)[1](cotangent)
        for f, w in zip(found, want):
            assert f.shape == w.shape
            np.testing.assert_allclose(f, w, rtol=1e-12, atol=1e-12)
        check_grads(cpu_kernels.linear, args, order=1, modes=['rev'])
