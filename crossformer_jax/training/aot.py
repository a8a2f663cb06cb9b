"""Ahead-of-time compilation of a config's programs for a device topology (`--mode compile`).

    python train.py --config configs/crossformer_tiny.py --mode compile --topology v5e:2x2

builds the train step and the evaluation step exactly as `train.py --mode train` does (model,
dtype, remat, FSDP, gradient accumulation, the task's on-device batch transform, the optimizer,
the config's global batch), over the devices of a TPU slice described by libtpu
(`jax.experimental.topologies`, no TPU needed: `pip install 'crossformer_jax[tpu]'`), and compiles
them without reading an image or a checkpoint. Per program and device it reports parameters and
optimizer state, temporaries, the peak against the chip's HBM, FLOPs and bytes accessed per step
and per image, and the compile time. The models trace with the plain primitives whatever the CPU
plug-in says (`crossformer_jax.models.ops`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from crossformer_jax import tasks
from crossformer_jax.models import complexity, model_spec, ops
from crossformer_jax.runtime import sharding as sharding_lib
from crossformer_jax.training import optimizer, trainer

GIB = 2**30
# How XLA:TPU says that a program's temporaries exceed the HBM ("... temporaries (944.03G) ...").
OUT_OF_MEMORY = re.compile(r'memory required for HLO temporaries \(([\d.]+)G\)')
# HBM of one chip, by the device_kind that libtpu reports for it.
CHIP_HBM_GIB = {'TPU v4': 32, 'TPU v5 lite': 16, 'TPU v5': 95, 'TPU v6 lite': 32}
TOPOLOGY_NAMES = {'v4', 'v5e', 'v5p', 'v6e'}


class TopologyError(RuntimeError):
    """The topology cannot be described here (unknown name, or libtpu is not installed)."""


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    devices: list[Any]
    chips: int

    @property
    def device_kind(self) -> str:
        return self.devices[0].device_kind

    @property
    def hbm_bytes_per_device(self) -> int:
        per_chip = CHIP_HBM_GIB[self.device_kind] * GIB
        return per_chip * self.chips // len(self.devices)


def describe_topology(name: str) -> Topology:
    """The devices of a TPU slice such as 'v5e:2x2', 'v4:2x2x1' or 'v6e:4x8'."""
    generation, _, shape = name.partition(':')
    dims = shape.split('x')
    if generation not in TOPOLOGY_NAMES or not shape or not all(d.isdigit() for d in dims):
        raise TopologyError(
            f'unknown topology {name!r}: expected GENERATION:SHAPE with GENERATION one of '
            f'{", ".join(sorted(TOPOLOGY_NAMES))}, e.g. v5e:2x2, v4:2x2x1, v6e:4x8'
        )
    try:
        from jax.experimental import topologies

        description = topologies.get_topology_desc(topology_name=name, platform='tpu')
    except Exception as error:  # libtpu missing, or refusing this shape
        raise TopologyError(
            f'cannot describe TPU topology {name!r} ({str(error).splitlines()[0][:200]}); '
            "the TPU compiler comes with libtpu: pip install 'crossformer_jax[tpu]'"
        ) from error
    devices = list(description.devices)
    if devices[0].device_kind not in CHIP_HBM_GIB:
        raise TopologyError(f'no HBM size known for {devices[0].device_kind!r} ({name})')
    return Topology(name, devices, math.prod(int(d) for d in dims))


@dataclasses.dataclass(frozen=True)
class ProgramReport:
    """What one compiled program needs on each device."""

    name: str
    argument_bytes: int  # parameters, optimizer state, the batch
    output_bytes: int
    alias_bytes: int  # outputs that reuse donated arguments
    temp_bytes: int
    flops: float
    bytes_accessed: float
    images_per_step: int
    num_devices: int
    compile_seconds: float
    hbm_bytes: int
    error: str | None = None  # the compiler's refusal, when the program does not fit at all

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.hbm_bytes

    @property
    def flops_per_image(self) -> float:
        return self.flops * self.num_devices / self.images_per_step

    def to_json(self) -> dict[str, Any]:
        return {
            'name': self.name,
            'peak_bytes_per_device': self.peak_bytes,
            'hbm_bytes_per_device': self.hbm_bytes,
            'argument_bytes_per_device': self.argument_bytes,
            'temp_bytes_per_device': self.temp_bytes,
            'flops_per_device': self.flops,
            'bytes_accessed_per_device': self.bytes_accessed,
            'flops_per_image': self.flops_per_image,
            'compile_seconds': round(self.compile_seconds, 1),
            'fits': self.fits,
            'error': self.error,
        }


def compile_report(
    name: str, jitted: Callable, args: tuple, images: int, topology: Topology
) -> tuple[ProgramReport, Any]:
    """Lowers and compiles `jitted` for `args` (abstract, with shardings): (its report, the
    compiled program)."""
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as error:
        # XLA:TPU refuses programs whose temporaries exceed the chip's HBM.
        needed = OUT_OF_MEMORY.search(str(error))
        if needed is None:
            raise
        report = ProgramReport(
            name=name,
            argument_bytes=0,
            output_bytes=0,
            alias_bytes=0,
            temp_bytes=int(float(needed.group(1)) * GIB),
            flops=math.nan,
            bytes_accessed=math.nan,
            images_per_step=images,
            num_devices=len(topology.devices),
            compile_seconds=time.perf_counter() - start,
            hbm_bytes=topology.hbm_bytes_per_device,
            error=str(error).splitlines()[0][:300],
        )
        return report, None
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return ProgramReport(
        name=name,
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        flops=float(cost.get('flops', math.nan)),
        bytes_accessed=float(cost.get('bytes accessed', math.nan)),
        images_per_step=images,
        num_devices=len(topology.devices),
        compile_seconds=seconds,
        hbm_bytes=topology.hbm_bytes_per_device,
    ), compiled


def with_sharding(tree: Any, shardings: Any) -> Any:
    """The abstract arrays of `tree` placed by `shardings` (a matching tree, or one sharding for
    every leaf)."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def config_num_classes(config: ml_collections.ConfigDict) -> int:
    """The number of classes without reading the data: config.data.num_classes where the config
    states it, else that of the model's released checkpoints."""
    return config.data.get('num_classes') or model_spec(config.model.name).num_classes


def compile_config(
    config: ml_collections.ConfigDict, topology: Topology
) -> tuple[list[ProgramReport], dict[str, str]]:
    """Compiles the train and evaluation steps of `config` for `topology`; returns their reports
    and the optimized program text of each (for inspection)."""
    mesh = Mesh(np.asarray(topology.devices), (sharding_lib.DATA_AXIS,))
    task = tasks.get_task(config, config_num_classes(config))
    reports, texts = [], {}
    with ops.using(ops.PLAIN):
        model = task.create_model(config)
        schedule = optimizer.create_learning_rate_schedule(config, 1, config.num_train_steps)
        tx = optimizer.create_optimizer(config, schedule)
        init_state = functools.partial(trainer.init_state, task, model, tx)
        abstract_state = jax.eval_shape(init_state, jax.random.key(0))
        state_sharding = sharding_lib.state_shardings(
            abstract_state, mesh, fsdp=config.fsdp, min_size=config.fsdp_min_size
        )
        batch = with_sharding(
            task.train_batch_spec(config, config.batch_size), sharding_lib.batch_sharding(mesh)
        )
        key = jax.eval_shape(lambda: jax.random.key(0))
        key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding_lib.replicated(mesh))
        train = trainer.jit_train_step(config, task, model, tx, schedule, mesh, state_sharding)
        report, compiled = compile_report(
            'train_step',
            train,
            (with_sharding(abstract_state, state_sharding), batch, key),
            config.batch_size,
            topology,
        )
        reports.append(report)
        texts[report.name] = compiled.as_text() if compiled else ''

        variables_sharding = {'params': state_sharding.params, **state_sharding.model_state}
        variables = with_sharding(abstract_state.variables, variables_sharding)
        evaluate, inputs, images, batched = task.eval_program(model, config)
        inputs_sharding = (
            sharding_lib.batch_sharding(mesh) if batched else sharding_lib.replicated(mesh)
        )
        jitted = jax.jit(
            evaluate,
            in_shardings=(variables_sharding, *[inputs_sharding] * len(inputs)),
            out_shardings=sharding_lib.replicated(mesh),
        )
        inputs = tuple(with_sharding(x, inputs_sharding) for x in inputs)
        report, compiled = compile_report(
            'eval_step', jitted, (variables, *inputs), images, topology
        )
        reports.append(report)
        texts[report.name] = compiled.as_text() if compiled else ''
    return reports, texts


def model_flops_per_image(config: ml_collections.ConfigDict) -> float:
    """2 x the analytic multiply-accumulates of one image's forward pass, at the height and
    width of the task's training batch; NaN for a model whose MACs are not counted (the table
    then shows no ratio)."""
    if model_spec(config.model.name).task == 'instance_segmentation':
        return math.nan
    num_classes = config_num_classes(config)
    task = tasks.get_task(config, num_classes)
    size = task.train_batch_spec(config, 1)['image'].shape[1:3]
    overrides = tasks.model_overrides(config)
    return 2.0 * complexity.model_macs(config.model.name, size, num_classes, **overrides)


def format_report(report: ProgramReport, forward_flops: float, train: bool) -> str:
    """One line of `--mode compile`'s table."""
    expected = forward_flops * (3 if train else 1)
    state = 'params+opt' if train else 'params'
    return (
        f'{report.name:<11} {state} {report.argument_bytes / GIB:7.2f} GiB  '
        f'temp {report.temp_bytes / GIB:7.2f} GiB  peak {report.peak_bytes / GIB:7.2f} of '
        f'{report.hbm_bytes / GIB:.0f} GiB ({"fits" if report.fits else "DOES NOT FIT"})  '
        f'{report.flops / 1e9:9.1f} GFLOP/device, {report.flops_per_image / 1e9:7.2f} GFLOP/image '
        f'({report.flops_per_image / expected:.3f} x {"3 x " if train else ""}2 x count_macs)  '
        f'{report.bytes_accessed / 1e9:8.1f} GB accessed/device  '
        f'compiled in {report.compile_seconds:.1f} s'
    )
