"""The learning-rate schedules and the optimizer of a config (AdamW, weight-decay masks,
gradient clipping)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax


def create_learning_rate_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
) -> optax.Schedule:
    """The learning rate of every step; config.lr_schedule picks the shape.

    'cosine' (default): linear warm-up from warmup_lr to base_lr, then cosine to min_lr. All three
    rates are given for a batch of config.lr_reference_batch (512) and scaled linearly by
    batch_size / 512. (The reference code evaluates the cosine at step / total from step 0, so
    its rate just after warm-up is a hair below the peak; here the cosine starts at the peak.)

    'poly': base_lr * (1 - step / total_steps) ** poly_power from step 0, multiplied during the
    first warmup_steps by 1 - (1 - step / warmup_steps) * (1 - warmup_ratio) (the segmentation
    recipe; warmup_steps 0 for none). Scaled by batch_size / lr_reference_batch too.

    'step': base_lr, multiplied by lr_decay_factor at each epoch of lr_decay_epochs (epoch e
    starts at step e * steps_per_epoch), with the same linear warm-up as 'poly' (the detection
    recipe). Scaled by batch_size / lr_reference_batch too.
    """
    scale = config.batch_size / config.lr_reference_batch
    kind = config.get('lr_schedule', 'cosine')
    if kind not in ('cosine', 'poly', 'step'):
        raise ValueError(f"config.lr_schedule must be 'cosine', 'poly' or 'step', got {kind!r}")
    if kind in ('poly', 'step'):
        peak, warmup_steps, warmup_ratio = (
            config.base_lr * scale,
            config.warmup_steps,
            config.warmup_ratio,
        )
        if kind == 'poly':
            power = config.poly_power

            def decayed(t):
                return peak * (1.0 - jnp.minimum(t, total_steps) / total_steps) ** power
        else:
            boundaries = jnp.asarray(
                [round(e * steps_per_epoch) for e in config.lr_decay_epochs], jnp.float32
            )
            factor = config.lr_decay_factor

            def decayed(t):
                return peak * factor ** jnp.sum(t >= boundaries)

        def schedule(step):
            t = jnp.asarray(step, jnp.float32)
            rate = decayed(t)
            if warmup_steps > 0:
                # 1 - (1 - t / W)(1 - ratio), written so that float32 keeps the ratio exact
                ramp = warmup_ratio + (1.0 - warmup_ratio) * (t / warmup_steps)
                rate = jnp.where(t < warmup_steps, rate * ramp, rate)
            return rate

        return schedule
    warmup_steps = min(round(config.warmup_epochs * steps_per_epoch), total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=config.warmup_lr * scale,
        peak_value=config.base_lr * scale,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=config.min_lr * scale,
    )


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: everything but 1-D ones (biases, norm scales)."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


# The LayerNorms whose PyTorch names contain 'norm' (patch_embed.norm, norm1, norm2,
# downsample.norm); the DPB's pos{n}_norm, ACL's ex_ln and BatchNorms ('bn') are not among them.
_NORM_MODULES = frozenset({'norm', 'norm1', 'norm2'})


def decay_mask_except_norms(params: Any) -> Any:
    """True for every parameter but those of the LayerNorms named norm / norm1 / norm2."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(getattr(k, 'key', None) in _NORM_MODULES for k in path), params
    )


DECAY_RULES = {
    'no_1d': decay_mask,
    'no_norm': decay_mask_except_norms,
    'all': lambda params: jax.tree.map(lambda _: True, params),
}


def create_optimizer(
    config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
    """Gradient-norm clipping (config.grad_clip_norm > 0), then AdamW with decoupled weight decay
    on the parameters config.weight_decay_rule picks ('no_1d' default, 'no_norm', 'all')."""
    rule = config.get('weight_decay_rule', 'no_1d')
    if rule not in DECAY_RULES:
        raise ValueError(
            f'config.weight_decay_rule must be one of {sorted(DECAY_RULES)}, got {rule!r}'
        )
    adamw = optax.adamw(
        schedule,
        b1=config.adam_b1,
        b2=config.adam_b2,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
        mask=DECAY_RULES[rule],
    )
    if config.grad_clip_norm <= 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw)
