"""Mixup / CutMix with label smoothing, on device (jit-friendly JAX).

Whole-batch mode as in the reference recipe (timm ``Mixup(mode='batch')``):
one mixing coefficient per batch; sample ``i`` is mixed with sample ``B-1-i``
(the batch reversed). With both Mixup and CutMix enabled, CutMix is chosen with
probability ``switch_prob``. Mixup: ``x = lam * x + (1 - lam) * x[::-1]`` with
``lam ~ Beta(mixup_alpha, mixup_alpha)``. CutMix: ``lam ~ Beta(cutmix_alpha,
cutmix_alpha)``; a box of size ``(int(H sqrt(1-lam)), int(W sqrt(1-lam)))``
centred at a uniform pixel and clipped to the image takes the pixels of
``x[::-1]``; then ``lam`` is corrected to ``1 - box area / (H W)`` (timm's
``correct_lam``), so it is exactly the fraction of pixels kept.

Targets: ``smooth(y) = one_hot(y) * (1 - ls) + ls / num_classes`` and
``target = lam * smooth(y) + (1 - lam) * smooth(y[::-1])``; every row sums to 1.

All shapes are static and the Mixup/CutMix choice is made with ``jnp.where``,
so the function can be traced once inside a jitted train step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_one_hot(labels: jax.Array, num_classes: int, label_smoothing: float = 0.0) -> jax.Array:
    """``one_hot * (1 - ls) + ls / num_classes`` in float32."""
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return one_hot * (1.0 - label_smoothing) + label_smoothing / num_classes


def cutmix_box(rng: jax.Array, lam: jax.Array, height: int, width: int):
    """timm ``rand_bbox``: returns (y_lo, y_hi, x_lo, x_hi) int32 scalars."""
    ky, kx = jax.random.split(rng)
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    cy = jax.random.randint(ky, (), 0, height)
    cx = jax.random.randint(kx, (), 0, width)
    y_lo = jnp.clip(cy - cut_h // 2, 0, height)
    y_hi = jnp.clip(cy + cut_h // 2, 0, height)
    x_lo = jnp.clip(cx - cut_w // 2, 0, width)
    x_hi = jnp.clip(cx + cut_w // 2, 0, width)
    return y_lo, y_hi, x_lo, x_hi


def mix_batch(
    rng: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    *,
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.1,
    mix_prob: float = 1.0,
    return_lam: bool = False,
):
    """Mixes a batch; returns ``(images, soft_targets)`` (plus ``lam`` if asked).

    Args:
      rng: a JAX PRNG key.
      images: (B, H, W, C) float array (any float dtype; it is kept).
      labels: (B,) integer class ids.
      num_classes: number of classes of the targets.
      mixup_alpha, cutmix_alpha: Beta parameters; 0 disables that method
        (both 0: no mixing, only label smoothing).
      switch_prob: probability of CutMix when both are enabled.
      label_smoothing: folded into the targets.
      mix_prob: probability that the batch is mixed at all (timm ``prob``).
      return_lam: also return the (corrected) mixing coefficient.

    Returns:
      images of the same shape and dtype, float32 targets (B, num_classes)
      and, with ``return_lam``, the scalar ``lam`` (weight of the original sample).
    """
    smooth = smooth_one_hot(labels, num_classes, label_smoothing)
    use_mixup_alpha = mixup_alpha > 0
    use_cutmix_alpha = cutmix_alpha > 0
    if not (use_mixup_alpha or use_cutmix_alpha):
        return (images, smooth, jnp.float32(1.0)) if return_lam else (images, smooth)

    k_apply, k_switch, k_beta, k_box = jax.random.split(rng, 4)
    _, height, width, _ = images.shape
    if use_mixup_alpha and use_cutmix_alpha:
        use_cutmix = jax.random.uniform(k_switch) < switch_prob
    else:
        use_cutmix = jnp.asarray(use_cutmix_alpha)
    # Beta(a, a) = Ga / (Ga + Gb) with Ga, Gb ~ Gamma(a): both Betas come from one
    # vectorised log-gamma draw (one sampler loop to compile instead of four).
    alphas = jnp.array([mixup_alpha, mixup_alpha, cutmix_alpha, cutmix_alpha], jnp.float32)
    alphas = jnp.where(alphas > 0, alphas, 1.0)  # disabled entries are unused
    log_g = jax.random.loggamma(k_beta, alphas)
    lam_mix = jax.nn.sigmoid(log_g[0] - log_g[1]) if use_mixup_alpha else jnp.float32(1.0)
    lam_cut = jax.nn.sigmoid(log_g[2] - log_g[3]) if use_cutmix_alpha else jnp.float32(1.0)

    # CutMix box and the corrected lambda (fraction of original pixels kept).
    y_lo, y_hi, x_lo, x_hi = cutmix_box(k_box, lam_cut, height, width)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    box = (rows >= y_lo) & (rows < y_hi) & (cols >= x_lo) & (cols < x_hi)
    box_area = ((y_hi - y_lo) * (x_hi - x_lo)).astype(jnp.float32)
    lam_cut = 1.0 - box_area / float(height * width)

    apply = jax.random.uniform(k_apply) < mix_prob if mix_prob < 1.0 else jnp.asarray(True)
    lam = jnp.where(use_cutmix, lam_cut, lam_mix)
    lam = jnp.where(apply, lam, 1.0)

    flipped = images[::-1]
    lam_x = lam.astype(images.dtype)
    mixed = lam_x * images + (1 - lam_x) * flipped
    cut = jnp.where(box[None, :, :, None], flipped, images)
    out = jnp.where(use_cutmix, cut, mixed)
    out = jnp.where(apply, out, images)

    targets = lam * smooth + (1.0 - lam) * smooth[::-1]
    if return_lam:
        return out, targets, lam
    return out, targets
