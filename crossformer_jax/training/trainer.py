"""Training, evaluation and throughput measurement of CrossFormer models, for any task.

The loop is task-agnostic; what is trained (model, preprocessing, batch transform, loss, evaluation
sums and metrics, the metric of the best checkpoint) comes from crossformer_jax.tasks, chosen by
config.task ('classification' or 'segmentation'). Read top to bottom:

1. configuration checks (`validate_config`), learning-rate schedule and optimizer;
2. the train state (parameters, optimizer state, model state such as BatchNorm statistics) and
   the pure, jit-compiled `train_step`;
3. `train_and_evaluate`: the loop (resume, train, log, evaluate, checkpoint, preemption);
4. `evaluate` and `measure_throughput`, the other two modes of train.py.

Parallelism is explicit: one 1-D mesh with axis 'data' over all devices
(crossformer_jax.runtime.sharding);
batches are split along it, the state is replicated or (config.fsdp) split FSDP-style. Every random
number of step s comes from fold_in(key(seed), s), and the input pipeline restarts at any step, so a
resumed run repeats exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow as tf
from absl import logging
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from crossformer_jax import tasks
from crossformer_jax.data import pipeline, sources
from crossformer_jax.runtime import sharding as sharding_lib
from crossformer_jax.runtime.compile_options import inference_compiler_options
from crossformer_jax.training import checkpointing, optimizer
from crossformer_jax.weights import pretrained


class ConfigError(ValueError):
    """The configuration cannot work (unknown model, indivisible batch, missing data...)."""


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss (or parameters); nothing was saved after it."""


# -------------------------------------------------------------------------------------------------
# Configuration checks.


def validate_config(config: ml_collections.ConfigDict, *, mode: str, device_count: int) -> None:
    """Raises ConfigError with a readable message for configurations that cannot run."""
    try:
        tasks.task_class(config).check_config(config, mode=mode)
    except ValueError as e:
        raise ConfigError(str(e)) from None

    if mode == 'train':
        batch, accum = config.batch_size, config.grad_accum_steps
        if batch <= 0 or accum <= 0:
            raise ConfigError(
                f'config.batch_size ({batch}) and config.grad_accum_steps ({accum}) '
                f'must be positive'
            )
        if batch % device_count:
            raise ConfigError(
                f'the global batch size config.batch_size={batch} is not divisible '
                f'by the number of devices ({device_count})'
            )
        if batch % (accum * device_count):
            raise ConfigError(
                f'config.batch_size={batch} must be divisible by '
                f'config.grad_accum_steps * devices = {accum} * {device_count}, so '
                f'that every micro-batch splits evenly over the devices'
            )
        for field in ('log_every_steps', 'checkpoint_every_steps'):
            if config[field] <= 0:
                raise ConfigError(f'config.{field} must be positive, got {config[field]}')
    if mode in ('train', 'evaluate') and config.eval_batch_size % device_count:
        raise ConfigError(
            f'config.eval_batch_size={config.eval_batch_size} is not divisible by '
            f'the number of devices ({device_count})'
        )
    if mode == 'throughput':
        batch = config.throughput.batch_size or config.batch_size
        if batch % device_count:
            raise ConfigError(
                f'throughput batch size {batch} is not divisible by the number of '
                f'devices ({device_count})'
            )

    if config.init_from and not sources.isdir(config.init_from):
        raise ConfigError(f'config.init_from={config.init_from!r} is not a directory')


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """The model of config.task and config.model with num_classes classes."""
    return tasks.get_task(config, num_classes).create_model(config)


# -------------------------------------------------------------------------------------------------
# Train state and steps.


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any
    model_state: Any = flax.struct.field(default_factory=dict)  # e.g. {'batch_stats': ...}

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, model_state=None) -> TrainState:
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            model_state=model_state or {},
        )

    @property
    def variables(self) -> dict[str, Any]:
        """What model.apply takes: the parameters and the model state collections."""
        return {'params': self.params, **self.model_state}


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    base_rng: jax.Array,
    *,
    model: nn.Module,
    task: tasks.Task,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum_steps: int,
    mesh: jax.sharding.Mesh,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch (pure; jit-compiled by the caller).

    The task transforms the batch as a whole (mixup), then (with gradient accumulation) it is cut
    into grad_accum_steps micro-batches whose gradients are averaged inside a lax.scan before the
    single update; the model state (BatchNorm statistics) passes from one micro-batch to the next.
    """
    rng = jax.random.fold_in(base_rng, state.step)
    batch_rng, dropout_rng = jax.random.split(rng)
    batch = task.transform_batch(batch_rng, batch, mesh)

    def loss_fn(params, model_state, batch, rng):
        return task.loss(model, params, model_state, batch, rng)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum_steps == 1:
        (loss, model_state), grads = grad_fn(state.params, state.model_state, batch, dropout_rng)
    else:
        # Micro-batch i takes rows i, i + A, i + 2A, ... so that each micro-batch is still spread
        # evenly over the devices (rows are laid out device after device).
        micro_sharding = NamedSharding(
            mesh, jax.sharding.PartitionSpec(None, sharding_lib.DATA_AXIS)
        )

        def split(x):
            x = x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:])
            return jax.lax.with_sharding_constraint(jnp.swapaxes(x, 0, 1), micro_sharding)

        def accumulate(carry, micro):
            loss_sum, grad_sum, model_state = carry
            index, micro_batch = micro
            (loss, model_state), grads = grad_fn(
                state.params, model_state, micro_batch, jax.random.fold_in(dropout_rng, index)
            )
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads), model_state), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (loss, grads, model_state), _ = jax.lax.scan(
            accumulate,
            (jnp.zeros((), jnp.float32), zeros, state.model_state),
            (jnp.arange(grad_accum_steps), jax.tree.map(split, batch)),
        )
        loss = loss / grad_accum_steps
        grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # The parameter norm is logged, and tells the loop whether the new parameters are finite.
    metrics = {
        'loss': loss,
        'grad_norm': optax.global_norm(grads),
        'param_norm': optax.global_norm(params),
        'learning_rate': schedule(state.step),
    }
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state
    )
    return new_state, metrics


def jit_train_step(
    config: ml_collections.ConfigDict,
    task: tasks.Task,
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: jax.sharding.Mesh,
    state_sharding: Any,
):
    """`train_step` jit-compiled with the run's shardings: (state, global batch, rng) -> (state,
    metrics); the state is donated. The loop and `--mode compile` build it here alike."""
    return jax.jit(
        functools.partial(
            train_step,
            model=model,
            task=task,
            tx=tx,
            schedule=schedule,
            grad_accum_steps=config.grad_accum_steps,
            mesh=mesh,
        ),
        in_shardings=(
            state_sharding,
            sharding_lib.batch_sharding(mesh),
            sharding_lib.replicated(mesh),
        ),
        out_shardings=(state_sharding, sharding_lib.replicated(mesh)),
        donate_argnums=0,
    )


# -------------------------------------------------------------------------------------------------
# Building blocks of the loop.


def init_state(
    task: tasks.Task, model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array
) -> TrainState:
    """A fresh train state: the task's initial variables, the optimizer's initial state."""
    variables = dict(task.init_variables(model, rng))
    params = variables.pop('params')
    return TrainState.create(params, tx, variables)


def load_pretrained_params(directory: str, params: Any, task: tasks.Task) -> Any:
    """Takes every parameter of a converted checkpoint whose path and shape match `params`.

    The Dynamic Position Bias makes every weight independent of the image size, so a checkpoint
    loads at any resolution. The task says how the checkpoint's names map into its model and which
    parameters may keep their fresh initialisation (`Task.pretrained_params`: a new head, say);
    any other mismatch means a different architecture and is an error.
    """
    _, variables = pretrained.load_pretrained(directory)
    logging.info(
        'Initialising from %s (%s).', directory, pretrained.read_metadata(directory)['model_name']
    )
    source = traverse_util.flatten_dict(flax.core.unfreeze(variables['params']), sep='/')
    target = traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
    source, may_start_fresh = task.pretrained_params(source, target)
    merged, fresh, problems = {}, [], []
    for path, value in target.items():
        loaded = source.get(path)
        if loaded is not None and tuple(loaded.shape) == tuple(value.shape):
            merged[path] = jnp.asarray(loaded, value.dtype)
        else:
            merged[path] = value
            (fresh if may_start_fresh(path, loaded) else problems).append(
                f'{path}: model {tuple(value.shape)}, checkpoint '
                f'{None if loaded is None else tuple(loaded.shape)}'
            )
    unused = sorted(set(source) - set(target))
    if problems or unused:
        raise ConfigError(
            f'checkpoint {directory!r} does not fit config.model ({config_hint(problems, unused)})'
        )
    if fresh:
        logging.info(
            'Re-initialised from scratch (shape differs from %s): %s', directory, '; '.join(fresh)
        )
    logging.info(
        'Loaded %d of %d parameter arrays from %s', len(target) - len(fresh), len(target), directory
    )
    return traverse_util.unflatten_dict(merged, sep='/')


def config_hint(problems: list[str], unused: list[str]) -> str:
    parts = []
    if problems:
        parts.append(f'{len(problems)} mismatched, e.g. {problems[0]}')
    if unused:
        parts.append(f'{len(unused)} unused, e.g. {unused[0]}')
    return '; '.join(parts)


class MetricWriter:
    """TensorBoard scalars in WORKDIR/tensorboard, plus WORKDIR/metrics.jsonl (one JSON object
    per write) when the workdir is local; silent off process 0."""

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        self._tf = tf
        self._writer = tf.summary.create_file_writer(os.path.join(workdir, 'tensorboard'))
        self._jsonl = (
            None
            if sources.is_remote(workdir)
            else open(os.path.join(workdir, 'metrics.jsonl'), 'a')  # noqa: SIM115 (closed in close())
        )

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.active:
            return
        with self._writer.as_default():
            for name, value in scalars.items():
                self._tf.summary.scalar(name, value, step=step)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
            self._jsonl.flush()

    def close(self) -> None:
        if self.active:
            self._writer.flush()
            if self._jsonl is not None:
                self._jsonl.close()


class PreemptionWatcher:
    """Notices SIGTERM. On one process a Python handler sets a flag; on several, the JAX
    distributed runtime's preemption notice makes every process stop at the same step."""

    def __init__(self):
        self._received = False
        self._previous = None
        self._multiprocess = jax.process_count() > 1
        if not self._multiprocess:
            self._previous = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        del frame
        logging.warning('Received signal %d; will checkpoint and stop after this step.', signum)
        self._received = True

    def should_stop(self, step: int) -> bool:
        if self._multiprocess:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._received

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:
        with tf.io.gfile.GFile(os.path.join(workdir, 'config.json'), 'w') as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def save_workdir_metadata(
    config: ml_collections.ConfigDict,
    workdir: str,
    num_classes: int,
    class_names: tuple[str, ...] | None,
) -> None:
    """WORKDIR/metadata.json: the model, the evaluation preprocessing (timm's pretrained-config
    fields) and the class names, so that predict.py and export_torch_weights.py can use the
    workdir's checkpoints without the config file."""
    if jax.process_index() != 0:
        return
    preprocessing = tasks.task_class(config).preprocessing(config)
    metadata = pretrained.workdir_metadata(
        model_name=config.model.name,
        model_overrides=tasks.model_overrides(config),
        num_classes=num_classes,
        preprocessing=preprocessing,
        label_names=class_names,
    )
    with tf.io.gfile.GFile(os.path.join(workdir, pretrained.METADATA_FILE), 'w') as f:
        f.write(json.dumps(metadata, indent=2, sort_keys=True) + '\n')


def _check_finite(pending: list[tuple[int, dict[str, jax.Array]]]) -> None:
    """Raises NonFiniteLossError at the first pending step with a NaN/inf loss or parameters.

    Called before every save, with the metrics of every step since the last check, so a
    checkpoint is only ever written from parameters that were finite at every step.
    """
    for step, metrics in jax.device_get(pending):
        loss, param_norm = float(metrics['loss']), float(metrics['param_norm'])
        if not math.isfinite(loss):
            what = f'non-finite loss {loss} at step {step}'
        elif not math.isfinite(param_norm):
            what = f'non-finite parameters after step {step} (loss {loss:.4g})'
        else:
            continue
        raise NonFiniteLossError(
            f'{what} (learning rate {float(metrics["learning_rate"]):.3g}, gradient norm '
            f'{float(metrics["grad_norm"]):.3g}); stopping without saving. The last good '
            f'checkpoint is kept; lower the learning rate or check the data.'
        )


# -------------------------------------------------------------------------------------------------
# Mode 'train'.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains (resuming from workdir if it holds a checkpoint), evaluates, checkpoints."""
    mesh = sharding_lib.create_mesh()
    validate_config(config, mode='train', device_count=mesh.size)
    if sources.is_remote(workdir):
        tf.io.gfile.makedirs(workdir)
    else:
        os.makedirs(workdir, exist_ok=True)

    info = tasks.task_class(config).dataset_info(config.data)
    num_classes = info.num_classes
    task = tasks.get_task(config, num_classes)
    steps_per_epoch = task.steps_per_epoch(info, config.batch_size)
    total_steps = (
        config.num_train_steps
        if config.num_train_steps > 0
        else int(config.num_epochs * steps_per_epoch)
    )
    eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
    logging.info(
        '%s on %d %s device(s) in %d process(es); %d classes, %d training images, '
        '%d steps per epoch, %d steps in all.',
        config.model.name,
        mesh.size,
        jax.devices()[0].platform,
        jax.process_count(),
        num_classes,
        info.num_train_examples,
        steps_per_epoch,
        total_steps,
    )

    model = task.create_model(config)
    schedule = optimizer.create_learning_rate_schedule(config, steps_per_epoch, total_steps)
    tx = optimizer.create_optimizer(config, schedule)

    # Shapes first, then shardings, then the real arrays created directly in their layout.
    seed_rng = jax.random.key(config.seed)
    init_rng, train_rng = jax.random.split(seed_rng)
    fresh_state = functools.partial(init_state, task, model, tx)
    abstract_state = jax.eval_shape(fresh_state, init_rng)
    abstract_params = abstract_state.params
    state_sharding = sharding_lib.state_shardings(
        abstract_state, mesh, fsdp=config.fsdp, min_size=config.fsdp_min_size
    )
    if config.fsdp:
        split = [
            x
            for x, sh in zip(
                jax.tree.leaves(abstract_params), jax.tree.leaves(state_sharding.params)
            )
            if not sh.is_fully_replicated
        ]
        logging.info(
            'FSDP: %d of %d parameter arrays (%.1f%% of the parameters) are split over '
            'the %d devices, with their optimizer moments.',
            len(split),
            len(jax.tree.leaves(abstract_params)),
            100
            * sum(x.size for x in split)
            / sum(x.size for x in jax.tree.leaves(abstract_params)),
            mesh.size,
        )

    ckpts = checkpointing.Checkpoints(
        workdir, keep=config.keep_checkpoints, best_metric=task.best_metric
    )
    if ckpts.latest_step() is not None:
        state = ckpts.restore(sharding_lib.with_shardings(abstract_state, state_sharding))
        logging.info('Resumed from %s at step %d.', ckpts.latest.directory, ckpts.latest_step())
    else:
        state = jax.jit(fresh_state, out_shardings=state_sharding)(init_rng)
        if config.init_from:
            params = jax.device_put(
                load_pretrained_params(config.init_from, state.params, task), state_sharding.params
            )
            state = jax.jit(
                lambda s, p: TrainState.create(p, tx, s.model_state),
                out_shardings=state_sharding,
                donate_argnums=(0, 1),
            )(state, params)
    start_step = int(jax.device_get(state.step))
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params))
    logging.info('Model has %s parameters.', f'{num_params:,}')
    save_config(config, workdir)
    save_workdir_metadata(config, workdir, num_classes, info.class_names)

    p_train_step = jit_train_step(config, task, model, tx, schedule, mesh, state_sharding)
    evaluator = task.make_evaluator(
        model, mesh, {'params': state_sharding.params, **state_sharding.model_state}, config
    )

    train_iter = sharding_lib.prefetch_to_device(
        task.create_train_iterator(config, start_step=start_step), mesh
    )

    def run_eval() -> dict[str, float]:
        return task.final_metrics(evaluator(state.variables))

    if start_step >= total_steps:
        logging.info(
            'Training is complete: the checkpoint is at step %d of %d; evaluating it.',
            start_step,
            total_steps,
        )
    writer = MetricWriter(workdir)
    preemption = PreemptionWatcher()
    pending: list[tuple[int, dict[str, jax.Array]]] = []  # metrics not yet checked/logged
    eval_metrics: dict[str, float] = {}
    step = start_step
    timer_step, timer_start = step, time.time()
    data_wait = 0.0  # seconds spent waiting for input batches since timer_start
    try:
        while step < total_steps:
            if preemption.should_stop(step):
                _check_finite(pending)
                ckpts.save(step, state)
                ckpts.wait()
                logging.warning(
                    'Preempted: saved a checkpoint at step %d in %s; exiting. Run the '
                    'same command again to resume.',
                    step,
                    ckpts.latest.directory,
                )
                return state

            wait_start = time.time()
            batch = next(train_iter)
            data_wait += time.time() - wait_start
            state, metrics = p_train_step(state, batch, train_rng)
            step += 1
            pending.append((step, metrics))
            if step == start_step + 1:  # the first step includes compilation
                jax.block_until_ready(metrics)
                logging.info(
                    'First step (with compilation) took %.1f s.', time.time() - timer_start
                )
                timer_step, timer_start, data_wait = step, time.time(), 0.0

            is_last = step == total_steps
            if step % config.log_every_steps == 0 or is_last:
                _check_finite(pending)
                now = time.time()
                host = [m for _, m in jax.device_get(pending)]
                averaged = {
                    k: float(np.mean([m[k] for m in host]))
                    for k in ('loss', 'grad_norm', 'param_norm')
                }
                averaged['learning_rate'] = float(host[-1]['learning_rate'])
                seconds_per_step = (now - timer_start) / max(step - timer_step, 1)
                images_per_second = config.batch_size / seconds_per_step
                # Time the loop waited for the input pipeline: near 100% means input-bound.
                wait_per_step = data_wait / max(step - timer_step, 1)
                wait_fraction = min(data_wait / max(now - timer_start, 1e-9), 1.0)
                logging.info(
                    'step %d/%d | epoch %.2f | loss %.4f | lr %.3e | grad_norm %.3f | %.1f img/s '
                    '| data wait %.1f ms/step (%.0f%%) | ETA %s',
                    step,
                    total_steps,
                    step / steps_per_epoch,
                    averaged['loss'],
                    averaged['learning_rate'],
                    averaged['grad_norm'],
                    images_per_second,
                    1e3 * wait_per_step,
                    100 * wait_fraction,
                    _format_eta(seconds_per_step * (total_steps - step)),
                )
                corrupt = pipeline.corrupt_image_count()
                if corrupt:
                    logging.warning(
                        '%d corrupt image(s) skipped so far (see the warnings that name them).',
                        corrupt,
                    )
                writer.write(
                    step,
                    {f'train/{k}': v for k, v in averaged.items()}
                    | {
                        'train/images_per_second': images_per_second,
                        'train/data_wait_seconds_per_step': wait_per_step,
                        'train/data_wait_fraction': wait_fraction,
                        'train/epoch': step / steps_per_epoch,
                        'train/corrupt_images': corrupt,
                    },
                )
                pending.clear()
                timer_step, timer_start, data_wait = step, time.time(), 0.0

            if step % eval_every == 0 or is_last:
                eval_start = time.time()
                eval_metrics = run_eval()
                logging.info('eval at step %d | %s', step, task.describe(eval_metrics))
                writer.write(
                    step, {f'eval/{k}': v for k, v in eval_metrics.items() if k != 'count'}
                )
                _check_finite(pending)
                if ckpts.save_if_best(step, state, eval_metrics):
                    logging.info(
                        'New best %s %.4f: saved to %s.',
                        task.best_metric,
                        eval_metrics[task.best_metric],
                        ckpts.best.directory,
                    )
                timer_start += time.time() - eval_start  # keep evaluation out of img/s

            if step % config.checkpoint_every_steps == 0 or is_last:
                _check_finite(pending)
                ckpts.save(step, state)
        if not eval_metrics:  # nothing left to train: report the finished run's accuracy
            eval_metrics = run_eval()
        ckpts.wait()
    finally:
        preemption.close()
        writer.close()
        ckpts.close()

    if eval_metrics:
        logging.info('Final validation %s after %d steps.', task.describe(eval_metrics), step)
    return state


# -------------------------------------------------------------------------------------------------
# Mode 'evaluate'.


def preprocessing_differences(config: ml_collections.ConfigDict, metadata: dict) -> list[str]:
    """One line per preprocessing field where config (as its task reads it) differs from the
    preprocessing stored with weights (the ImageNet defaults for older directories)."""
    stored = pretrained.preprocessing_from_metadata(metadata)
    ours = tasks.task_class(config).preprocessing(config)
    return [
        f'{field}={getattr(ours, field)} from config.data differs from the '
        f'{getattr(stored, field)} stored with the weights'
        for field in ('input_size', 'crop_pct', 'mean', 'std')
        if not np.allclose(getattr(ours, field), getattr(stored, field))
    ]


def evaluate(config: ml_collections.ConfigDict, workdir: str | None) -> dict[str, float]:
    """The task's validation metrics (top-1 / top-5 / loss; mIoU / aAcc / mAcc).

    Weights come from the workdir's best checkpoint (or latest, per config.eval_checkpoint) if it
    has one, else from the converted checkpoint directory config.init_from.
    """
    mesh = sharding_lib.create_mesh()
    validate_config(config, mode='evaluate', device_count=mesh.size)
    info = tasks.task_class(config).dataset_info(config.data)
    task = tasks.get_task(config, info.num_classes)

    ckpts = (
        checkpointing.Checkpoints(workdir, best_metric=task.best_metric)
        if workdir and sources.isdir(os.path.join(workdir, checkpointing.LATEST_DIR))
        else None
    )
    has_ckpt = ckpts is not None and ckpts.latest_step() is not None
    if has_ckpt:
        which = config.eval_checkpoint
        if which == 'best' and ckpts.best_step() is None:
            logging.info('No best checkpoint in %s yet; using the latest.', workdir)
            which = 'latest'
        model = task.create_model(config)
        steps_per_epoch = task.steps_per_epoch(info, config.batch_size)
        tx = optimizer.create_optimizer(
            config, optimizer.create_learning_rate_schedule(config, steps_per_epoch, 1)
        )
        abstract_state = jax.eval_shape(
            functools.partial(init_state, task, model, tx), jax.random.key(0)
        )
        shardings = sharding_lib.state_shardings(
            abstract_state, mesh, fsdp=config.fsdp, min_size=config.fsdp_min_size
        )
        state = ckpts.restore(sharding_lib.with_shardings(abstract_state, shardings), which=which)
        variables = state.variables
        variables_sharding = {'params': shardings.params, **shardings.model_state}
        source = f'{which} checkpoint of {workdir} (step {int(state.step)})'
        ckpts.close()
    elif config.init_from:
        model, variables = pretrained.load_pretrained(
            config.init_from, dtype=config.model.get('dtype')
        )
        if getattr(model, 'num_classes', info.num_classes) != info.num_classes:
            raise ConfigError(
                f'{config.init_from} has a {model.num_classes}-class head but the '
                f'dataset has {info.num_classes} classes'
            )
        variables_sharding = jax.tree.map(lambda _: sharding_lib.replicated(mesh), variables)
        variables = jax.device_put(variables, variables_sharding)
        source = f'converted checkpoint {config.init_from}'
        for problem in preprocessing_differences(
            config, pretrained.read_metadata(config.init_from)
        ):
            logging.warning('%s (the weights in %s)', problem, config.init_from)
    else:
        raise ConfigError(
            f'nothing to evaluate: no checkpoint in workdir {workdir!r} and no config.init_from'
        )

    logging.info('Evaluating the %s on %s/%s.', source, config.data.dataset, config.data.eval_split)
    evaluator = task.make_evaluator(model, mesh, variables_sharding, config)
    metrics = task.final_metrics(evaluator(variables))
    logging.info('Validation %s', task.describe(metrics))
    return metrics


# -------------------------------------------------------------------------------------------------
# Mode 'throughput'.


def measure_throughput(config: ml_collections.ConfigDict) -> float:
    """Images per second of the jit-compiled forward pass (inference) after warm-up.

    Uses config.throughput.batch_size (or config.batch_size when 0) images of the task's training
    batch shape (`train_batch_spec`), random weights, and the configured dtype.
    """
    mesh = sharding_lib.create_mesh()
    validate_config(config, mode='throughput', device_count=mesh.size)
    batch_size = config.throughput.batch_size or config.batch_size
    task = tasks.get_task(config, num_classes=config.data.get('num_classes', 1000))
    model = task.create_model(config)
    repl = sharding_lib.replicated(mesh)
    variables = jax.jit(functools.partial(task.init_variables, model), out_shardings=repl)(
        jax.random.key(config.seed)
    )
    image_shape = task.train_batch_spec(config, batch_size)['image'].shape
    images = jax.jit(
        lambda k: jax.random.normal(k, image_shape, jnp.float32),
        out_shardings=sharding_lib.batch_sharding(mesh),
    )(jax.random.key(1))
    forward = jax.jit(
        lambda v, x: model.apply(v, x, train=False),
        in_shardings=(repl, sharding_lib.batch_sharding(mesh)),
        compiler_options=inference_compiler_options(),
    )
    for _ in range(config.throughput.warmup_steps):
        jax.block_until_ready(forward(variables, images))
    start = time.perf_counter()
    for _ in range(config.throughput.num_steps):
        out = forward(variables, images)
    jax.block_until_ready(out)
    elapsed = time.perf_counter() - start
    rate = batch_size * config.throughput.num_steps / elapsed
    logging.info(
        '%s at %dx%d, batch %d, %s on %d %s device(s): %.1f images/s.',
        config.model.name,
        image_shape[1],
        image_shape[2],
        batch_size,
        config.model.get('dtype', 'float32'),
        mesh.size,
        jax.devices()[0].platform,
        rate,
    )
    return rate
