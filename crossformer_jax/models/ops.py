"""The numerical primitives of the models in plain JAX, and the one seam where a plug-in swaps them.

The layers compute LayerNorm, dense products, attention inside groups of tokens and the strided
convolutions of the cross-scale embeddings through `current()`, an `Ops` record of four functions.
By default that is `PLAIN`: the formulas below, differentiated by JAX, one program for CPU, GPU and
TPU. A backend plug-in (the XLA:CPU kernels, `crossformer_jax.cpu`) installs its own record with
`set_ops`; the record is read when a function is traced, so switch before `jax.jit` traces.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp


def layer_norm_statistics(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """Mean and 1 / sqrt(variance + eps) of x (..., C) over its last axis, each (..., 1)."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centered = x - mean
    return mean, jax.lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + eps)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis of x (..., C) with scale and bias (C,) -> (..., C)."""
    mean, rstd = layer_norm_statistics(x, eps)
    return (x - mean) * rstd * scale + bias


def linear(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """x (..., Cin) @ kernel (Cin, Cout) + bias (Cout,) -> (..., Cout)."""
    return x @ kernel + bias


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """(B, T, S, heads * hd) -> (S, B, heads, T, hd)."""
    b, t, s, c = x.shape
    return jnp.transpose(x.reshape(b, t, s, num_heads, c // num_heads), (2, 0, 3, 1, 4))


def attention_probabilities(
    q: jax.Array, k: jax.Array, position_bias: jax.Array, key_bias: jax.Array | None
) -> jax.Array:
    """Softmax of q (B, heads, T, hd) against k (B, heads, T, hd), scaled by hd^-1/2, plus
    position_bias (heads, T, T) and key_bias (G, T) (group b takes row b % G) -> (B, heads, T, T),
    in float32 at least."""
    b, num_heads, t, head_dim = q.shape
    softmax_dtype = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum('bhqd,bhkd->bhqk', q * head_dim**-0.5, k).astype(softmax_dtype)
    logits = logits + position_bias
    if key_bias is not None:
        g = key_bias.shape[0]
        logits = logits.reshape(b // g, g, num_heads, t, t) + key_bias[:, None, None, :]
        logits = logits.reshape(b, num_heads, t, t)
    unnormalized = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    return unnormalized / jnp.sum(unnormalized, axis=-1, keepdims=True)


def group_attention(
    qkv: jax.Array,
    position_bias: jax.Array,
    key_bias: jax.Array | None,
    keep: jax.Array | None,
    num_heads: int,
) -> jax.Array:
    """Multi-head softmax attention inside groups of T tokens.

    qkv (B, T, 3C): each token's query, key and value, C = heads * hd channels each, head-major;
    position_bias (heads, T, T) is added to the scaled logits, key_bias (G, T) or None to the logits
    of group b's keys as key_bias[b % G]; keep (B, heads, T, T) or None multiplies the softmax
    (dropout, already divided by the keep rate). Returns (B, T, C), heads concatenated. The softmax
    runs in float32 at least.
    """
    b, t, c3 = qkv.shape
    q, k, v = split_heads(qkv.reshape(b, t, 3, c3 // 3), num_heads)
    probs = attention_probabilities(q, k, position_bias, key_bias)
    weights = (probs if keep is None else probs * keep).astype(qkv.dtype)
    out = jnp.einsum('bhqk,bhkd->bqhd', weights, v)
    return out.reshape(b, t, c3 // 3)


def strided_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """x (N, H, W, Cin) convolved with kernel (k, k, Cin, Cout), stride s and `padding` zeros on
    every side -> (N, Ho, Wo, Cout)."""
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        ((padding, padding), (padding, padding)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    )


@dataclasses.dataclass(frozen=True)
class Ops:
    """The primitives a model is traced with; each has the signature of the plain function of the
    same name in this module."""

    name: str
    layer_norm: Callable[..., jax.Array]
    linear: Callable[..., jax.Array]
    group_attention: Callable[..., jax.Array]
    strided_conv: Callable[..., jax.Array]


PLAIN = Ops('plain', layer_norm, linear, group_attention, strided_conv)

_current = PLAIN


def current() -> Ops:
    """The primitives that layers traced now use."""
    return _current


def set_ops(ops: Ops) -> Ops:
    """Makes `ops` the primitives of every model traced from now on; returns the previous ones."""
    global _current
    if not isinstance(ops, Ops):
        raise TypeError(f'set_ops takes an Ops record, got {type(ops).__name__}')
    previous, _current = _current, ops
    return previous


@contextlib.contextmanager
def using(ops: Ops) -> Iterator[Ops]:
    """`set_ops(ops)` inside the block, the previous primitives again after it."""
    previous = set_ops(ops)
    try:
        yield ops
    finally:
        set_ops(previous)
