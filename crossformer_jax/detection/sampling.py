"""Random sampling of assigned anchors or RoIs (MMDetection's RandomSampler with
neg_pos_ub=-1) with a fixed number of slots and a validity mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from crossformer_jax.detection.assignment import NEGATIVE, POSITIVE


def sample(
    state: jax.Array, rng: jax.Array, *, num: int, pos_fraction: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draws a uniformly random subset of the positives and negatives of one image (vmap for a
    batch).

    state (N,) int32 (POSITIVE 1, NEGATIVE 0, IGNORED -1), rng a PRNG key -> indices (num,)
    int32 into state, is_positive (num,) bool and valid (num,) bool. MMDetection's counts:
    num_pos = min(#positives, int(num * pos_fraction)) positives in the first slots, then
    num_neg = min(#negatives, num - num_pos) negatives; the remaining slots are invalid (index 0).
    Each subset of a given size is equally likely (the top-k of uniform random priorities).
    """
    if state.ndim != 1 or state.shape[0] == 0:
        raise ValueError(f'state must be (N,) with N >= 1, got shape {tuple(state.shape)}')
    if not isinstance(num, int) or num < 1:
        raise ValueError(f'num must be a positive integer, got {num!r}')
    if not 0.0 <= pos_fraction <= 1.0:
        raise ValueError(f'pos_fraction must be in [0, 1], got {pos_fraction!r}')
    size = state.shape[0]
    positive, negative = state == POSITIVE, state == NEGATIVE
    pos_quota = int(num * pos_fraction)
    num_pos = jnp.minimum(jnp.sum(positive), pos_quota)
    num_neg = jnp.minimum(jnp.sum(negative), num - num_pos)

    # Uniform priorities in [0, 1); -1 marks what is not eligible, so it ranks last. At least one
    # positive slot is drawn so that the gathers below have something to index (a quota of 0
    # leaves it unused).
    priority = jax.random.uniform(rng, (size,))
    pos_slots = max(min(pos_quota, size), 1)
    _, pos_order = jax.lax.top_k(jnp.where(positive, priority, -1.0), pos_slots)
    _, neg_order = jax.lax.top_k(jnp.where(negative, priority, -1.0), min(num, size))

    # Slot s holds positive s when s < num_pos, else negative s - num_pos.
    slots = jnp.arange(num)
    is_positive = slots < num_pos
    neg_slot = slots - num_pos
    valid = is_positive | ((neg_slot >= 0) & (neg_slot < num_neg))
    indices = jnp.where(
        is_positive,
        pos_order[jnp.clip(slots, 0, pos_slots - 1)],
        neg_order[jnp.clip(neg_slot, 0, neg_order.shape[0] - 1)],
    )
    return jnp.where(valid, indices, 0).astype(jnp.int32), is_positive, valid
