"""Device mesh and shardings for data-parallel (optionally FSDP-style) training.

Everything runs on a 1-D mesh with one axis, 'data', spanning every device of every process:

* a batch is split along its leading axis: NamedSharding(mesh, P('data'));
* parameters and optimizer state are replicated by default;
* with `fsdp=True`, each large array is instead split along its largest dimension that the axis
  size divides (a PartitionSpec with 'data' at that position), which cuts per-device memory for
  the big variants; XLA inserts the all-gathers and reduce-scatters.

The same code runs on one CPU, on simulated host devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8), on GPUs and on multi-host TPU slices.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'


def create_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all devices (of all processes), with the single axis 'data'."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over 'data', everything else whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], axis_size: int, min_size: int) -> P:
    """PartitionSpec that splits the largest dimension divisible by axis_size, or P() (replicated).

    Arrays with fewer than min_size elements stay replicated: splitting them saves little memory
    and costs a collective each.
    """
    if axis_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    # Largest dimension first; among equals, the last one (usually the output features).
    order = sorted(range(len(shape)), key=lambda d: (shape[d], d), reverse=True)
    for dim in order:
        if shape[dim] % axis_size == 0:
            spec = [None] * len(shape)
            spec[dim] = DATA_AXIS
            return P(*spec)
    return P()


def state_shardings(abstract_state: Any, mesh: Mesh, *, fsdp: bool, min_size: int = 2**16) -> Any:
    """NamedShardings for every leaf of a (shape-only) train state.

    Optimizer moments have the shapes of the parameters, so the same shape rule gives them the
    same layout as the parameter they belong to. Scalars (step counters) are replicated.
    """
    axis_size = mesh.shape[DATA_AXIS]

    def leaf_sharding(leaf):
        shape = tuple(getattr(leaf, 'shape', ()))
        spec = fsdp_spec(shape, axis_size, min_size) if fsdp else P()
        return NamedSharding(mesh, spec)

    return jax.tree.map(leaf_sharding, abstract_state)


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the given shardings (targets for restoring a checkpoint)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings
    )


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's slice of the batch into one global array sharded along 'data'.

    On a single process this is just a device_put; on several, process i contributes rows
    [i * local, (i + 1) * local) of the global batch.
    """
    sharding = batch_sharding(mesh)
    return {
        name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for name, value in local_batch.items()
    }


def prefetch_to_device(iterator: Iterator[dict[str, np.ndarray]], mesh, size: int = 2):
    """Yields global, sharded batches, keeping `size` of them in flight ahead of the consumer."""
    queue = collections.deque()
    for batch in iterator:
        queue.append(global_batch(batch, mesh))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
