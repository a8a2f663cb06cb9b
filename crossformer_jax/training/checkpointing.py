"""Checkpoints of the train state in a workdir, with orbax.

Two CheckpointManagers, in two directories, so that both guarantees hold independently:

* `WORKDIR/checkpoints/`: the most recent `keep` saves (periodic, final, and on preemption); this
  is what a restarted run resumes from.
* `WORKDIR/checkpoints_best/`: the single checkpoint with the best validation metric seen so far
  (`best_metric`, higher is better: top-1, mIoU...), with its evaluation metrics (orbax's
  `best_fn` picks what to keep).

Saves are asynchronous (the device-to-host copy happens in `save`, the writing in a background
thread), so the train step may donate the state right after `save` returns. Orbax writes into a
temporary directory and renames it when complete, so a run killed mid-save leaves the previous
checkpoints intact and the half-written one is ignored.

Several processes: every process calls every method at the same steps (each writes its shards;
process 0 renames), and orbax synchronises them with named barriers of the JAX distributed
runtime. Those names are built from the step, so the two managers saving the same step (a new
best at a periodic save, always the case at the last step) would meet in one barrier and fail
('Barrier ... is already ongoing'). Each manager therefore gets its own barrier prefix (orbax's
`MultiprocessingOptions.barrier_sync_key_prefix`, meant for managers used concurrently): the two
saves still run side by side in the background, and nothing waits on the other.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

LATEST_DIR = 'checkpoints'
BEST_DIR = 'checkpoints_best'
BEST_METRIC = 'top1'


class Checkpoints:
    """The 'latest' and 'best' checkpoints of one workdir."""

    def __init__(
        self,
        workdir: str,
        *,
        keep: int = 3,
        async_save: bool = True,
        best_metric: str = BEST_METRIC,
    ):
        self.best_metric = best_metric
        if '://' not in workdir:  # local paths must be absolute for orbax; gs:// etc. as they are
            workdir = os.path.abspath(workdir)
        self.latest = ocp.CheckpointManager(
            os.path.join(workdir, LATEST_DIR),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                create=True,
                enable_async_checkpointing=async_save,
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    barrier_sync_key_prefix=LATEST_DIR
                ),
            ),
        )
        self.best = ocp.CheckpointManager(
            os.path.join(workdir, BEST_DIR),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1,
                best_fn=lambda metrics: metrics[best_metric],
                best_mode='max',
                keep_checkpoints_without_metrics=False,
                create=True,
                enable_async_checkpointing=async_save,
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    barrier_sync_key_prefix=BEST_DIR
                ),
            ),
        )
        metrics = self.best_metrics()
        self._best_value = float('-inf') if metrics is None else float(metrics[best_metric])

    # -- queries -----------------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def best_step(self) -> int | None:
        return self.best.best_step()

    def best_metrics(self) -> dict[str, float] | None:
        """Evaluation metrics of the best checkpoint written completely (None if none)."""
        step = self.best_step()
        return None if step is None else dict(self.best.metrics(step))

    def best_value(self) -> float:
        """metrics[best_metric] of the best checkpoint, -inf when there is none yet.

        Kept in memory from the last save_if_best: orbax has no metrics for a step whose
        asynchronous save is still being written, so reading them back would forget a best
        checkpoint saved one evaluation earlier.
        """
        return self._best_value

    # -- saving ------------------------------------------------------------------------------------

    def save(self, step: int, state: Any) -> bool:
        """Saves state as the latest checkpoint at step (no-op if that step is already saved)."""
        if step in self.latest.all_steps():
            return False
        return self.latest.save(step, args=ocp.args.StandardSave(state), force=True)

    def save_if_best(self, step: int, state: Any, metrics: dict[str, float]) -> bool:
        """Saves state into the 'best' directory if metrics[best_metric] beats every earlier one."""
        if self.best_metric not in metrics:
            raise KeyError(
                f'best_metric {self.best_metric!r} is not among the evaluation metrics '
                f'{sorted(metrics)}'
            )
        value = float(metrics[self.best_metric])
        if value <= self._best_value or step in self.best.all_steps():
            return False
        saved = self.best.save(
            step,
            args=ocp.args.StandardSave(state),
            metrics={k: float(v) for k, v in metrics.items()},
            force=True,
        )
        if saved:
            self._best_value = value
        return saved

    # -- restoring ---------------------------------------------------------------------------------

    def restore(self, target: Any, *, which: str = 'latest', step: int | None = None) -> Any:
        """Restores the 'latest' or 'best' checkpoint (or a given step) into the target's layout.

        target: the train state's structure with jax.ShapeDtypeStruct leaves that carry the
        shardings to restore into (see sharding.with_shardings).
        """
        manager = {'latest': self.latest, 'best': self.best}[which]
        if step is None:
            step = manager.latest_step() if which == 'latest' else manager.best_step()
        if step is None:
            raise FileNotFoundError(f'no {which} checkpoint in {manager.directory}')
        return manager.restore(step, args=ocp.args.StandardRestore(target))

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def restore_variables(directory: str, model: Any, collections: tuple[str, ...] | None = None):
    """Restores the float32 variables of `model` (all collections, or only `collections`, e.g.
    ('params',) from a train state) from the orbax checkpoint in `directory`, onto one device.
    Raises ValueError naming the directory and orbax's first line of complaint."""
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)
    if collections is not None:
        shapes = {name: shapes[name] for name in collections}
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=device), dict(shapes)
    )
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            return checkpointer.restore(
                directory,
                args=ocp.args.PyTreeRestore(
                    item=abstract,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                    partial_restore=collections is not None,
                ),
            )
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f'cannot restore the variables in {directory}: {first[:300]}') from e
