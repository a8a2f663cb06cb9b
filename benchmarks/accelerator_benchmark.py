"""Train-step and inference throughput, compile time, memory and MFU on the accelerator JAX sees.

For each model it measures, in `--dtype` (bfloat16 by default, parameters float32):
- the Flax train step (forward with stochastic depth, cross-entropy, backward, AdamW; one
  jit-compiled function with donated state, the batch sharded over all local devices with
  `jax.sharding.NamedSharding`), with rematerialisation off and/or on;
- Flax inference (jit-compiled forward);
- beside it the PyTorch reference on the same device with AMP (`torch.autocast` to bfloat16)
  eagerly and, where it compiles, under `torch.compile`.

MFU = model FLOPs per step / step time / (device peak dense bf16 FLOP/s x devices). Model FLOPs
are 2 x `crossformer_jax.models.complexity.count_macs` per image (x 3 for forward + backward in a
train
step). Peak memory is the device's `peak_bytes_in_use` (process-wide high-water mark so far,
where `memory_stats()` exists) and XLA's own estimate for the compiled step (arguments + outputs
+ temporaries). Only the model code is imported (no TensorFlow), so this runs on machines that
have just JAX, Flax, Optax and PyTorch.

    python benchmarks/accelerator_benchmark.py --model crossformer_small crossformer_base
    python benchmarks/accelerator_benchmark.py --model crossformer_tiny --batch 2 \
        --image-size 64 --steps 2 --overrides '{"depths": [1, 1, 1, 1]}'   # CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

from cpu_benchmark import flax_forward, flax_train_step

# JAX grows its GPU memory pool as needed instead of taking 75% up front, so that PyTorch, run
# in the same process, has room.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

# Peak dense (no sparsity) bfloat16 FLOP/s per device, from the vendors' data sheets; matched
# against `device.device_kind` by the first substring that occurs in it (order matters).
PEAK_BF16_FLOPS = (
    ('H100 PCIe', 756e12),
    ('H100 NVL', 835e12),
    ('H100', 989.4e12),  # SXM
    ('H200', 989.4e12),
    ('A100', 312e12),
    ('L4', 121e12),
    ('TPU v4', 275e12),
    ('TPU v5 lite', 197e12),  # v5e
    ('TPU v5e', 197e12),
    ('TPU v5p', 459e12),
    ('TPU v5', 459e12),
    ('TPU v6 lite', 918e12),  # v6e (Trillium)
    ('TPU v6e', 918e12),
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', nargs='+', default=['crossformer_small', 'crossformer_base'])
    parser.add_argument('--batch', type=int, default=128, help='images per device')
    parser.add_argument('--image-size', type=int, default=224)
    parser.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float32'))
    parser.add_argument('--steps', type=int, default=20, help='timed steps per measurement')
    parser.add_argument('--warmup', type=int, default=3, help='untimed steps after compilation')
    parser.add_argument('--remat', choices=('off', 'on', 'both'), default='both')
    parser.add_argument('--no-torch', action='store_true', help='skip the PyTorch reference')
    parser.add_argument('--no-torch-compile', action='store_true', help='skip torch.compile')
    parser.add_argument('--overrides', default=None, help='JSON dict of model overrides')
    parser.add_argument('--json', default=None, help='also write the rows to this file')
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        parser.error('--steps and --batch must be positive')
    return args


def peak_flops(device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s of one device of this kind, None if unknown (e.g. CPU)."""
    for name, flops in PEAK_BF16_FLOPS:
        if name.lower() in device_kind.lower():
            return flops
    return None


def timed(step, steps: int, warmup: int, sync) -> tuple[float, float]:
    """(first call seconds, mean seconds per step over `steps` steps after `warmup` more)."""
    start = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - start
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return first, (time.perf_counter() - start) / steps


def jax_peak_bytes() -> int | None:
    import jax

    stats = jax.local_devices()[0].memory_stats()
    return stats.get('peak_bytes_in_use') if stats else None


def compiled_bytes(compiled) -> int | None:
    """XLA's memory estimate of a compiled executable: arguments + outputs + temporaries."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return (
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )


def init_flax_params(name: str, args, overrides: dict):
    """The model's initial parameters, replicated over the local devices: one initialisation per
    model serves every measurement (remat changes no parameter; compiling init is slow on CPU)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from crossformer_jax.models import create_model

    replicated = NamedSharding(Mesh(np.array(jax.local_devices()), ('data',)), PartitionSpec())
    model = create_model(name, dtype=jnp.dtype(args.dtype), **overrides)
    images = jnp.zeros((1, args.image_size, args.image_size, 3), jnp.float32)
    return jax.jit(model.init, out_shardings=replicated)(jax.random.key(0), images)['params']


def bench_flax(name: str, mode: str, remat: bool, params, args, overrides: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from crossformer_jax.models import create_model

    devices = jax.local_devices()
    mesh = Mesh(np.array(devices), ('data',))
    batch_sharding = NamedSharding(mesh, PartitionSpec('data'))
    replicated = NamedSharding(mesh, PartitionSpec())
    global_batch = args.batch * len(devices)
    model = create_model(name, dtype=jnp.dtype(args.dtype), remat=remat, **overrides)
    key = jax.random.key(0)
    shape = (global_batch, args.image_size, args.image_size, 3)
    images = jax.device_put(jax.random.normal(key, shape, jnp.float32), batch_sharding)
    labels = jax.device_put(
        jax.random.randint(key, (global_batch,), 0, model.num_classes), batch_sharding
    )

    start = time.perf_counter()
    if mode == 'inference':
        fn = flax_forward(model)
        compiled = fn.lower(params, images).compile()
        compile_s = time.perf_counter() - start
        step = lambda: compiled(params, images)  # noqa: E731 (a one-line closure)
        result = {'out': None}

        def run():
            result['out'] = step()

        sync = lambda: jax.block_until_ready(result['out'])  # noqa: E731
    else:
        params = jax.tree.map(jnp.copy, params)  # the step donates its state; keep the caller's
        optimizer = optax.adamw(learning_rate=1e-3, weight_decay=0.05)
        opt_state = jax.jit(optimizer.init, out_shardings=replicated)(params)
        train_step = flax_train_step(model, optimizer)
        compiled = train_step.lower(params, opt_state, images, labels, key).compile()
        compile_s = time.perf_counter() - start
        state = {'params': params, 'opt_state': opt_state, 'key': key, 'loss': None}

        def run():
            state['key'], step_key = jax.random.split(state['key'])
            state['params'], state['opt_state'], state['loss'] = compiled(
                state['params'], state['opt_state'], images, labels, step_key
            )

        sync = lambda: jax.block_until_ready(state['loss'])  # noqa: E731
    _first, step_s = timed(run, args.steps, args.warmup, sync)
    return {
        'devices': len(devices),
        'global_batch': global_batch,
        'step_s': step_s,
        'compile_s': compile_s,
        'peak_bytes': jax_peak_bytes(),
        'compiled_bytes': compiled_bytes(compiled),
    }


def bench_torch(name: str, mode: str, use_compile: bool, args, overrides: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from crossformer_jax.reference.crossformer import create_torch_model

    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    amp_dtype = getattr(torch, args.dtype)

    def autocast():  # float32: no autocast (the plain float32 reference)
        if amp_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=amp_dtype)

    torch.manual_seed(0)
    model = create_torch_model(name, **overrides).to(device)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, model.head.out_features, (args.batch,), device=device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    module = torch.compile(model) if use_compile else model

    if mode == 'inference':
        model.eval()

        def run():
            with torch.inference_mode(), autocast():
                module(images)
    else:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)

        def run():
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = F.cross_entropy(module(images), labels)
            loss.backward()
            optimizer.step()

    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    first_s, step_s = timed(run, args.steps, args.warmup, sync)
    return {
        'devices': 1,
        'global_batch': args.batch,
        'step_s': step_s,
        'compile_s': max(first_s - step_s, 0.0) if use_compile else None,
        'peak_bytes': torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else None,
        'compiled_bytes': None,
    }


def _gib(value: int | None) -> str:
    return '-' if value is None else f'{value / 2**30:.2f}'


def main(argv=None) -> None:
    args = parse_args(argv)
    overrides = json.loads(args.overrides) if args.overrides else {}

    import jax

    from crossformer_jax.models.complexity import count_macs

    device = jax.local_devices()[0]
    peak = peak_flops(device.device_kind)
    print(
        f'{jax.local_device_count()} x {device.device_kind} ({device.platform}), '
        f'peak bf16 {"unknown" if peak is None else f"{peak / 1e12:.1f} TFLOP/s"} per device, '
        f'{args.dtype}, {args.image_size}px, batch {args.batch} per device, jax {jax.__version__}'
    )
    header = (
        f'{"framework":<16}{"model":<20}{"mode":<10}{"remat":<6}{"batch":>6}{"img/s":>10}'
        f'{"step ms":>10}{"compile s":>10}{"peak GiB":>9}{"XLA GiB":>9}{"MFU %":>7}'
    )
    print(header, flush=True)
    # Remat on first: the process-wide peak memory then grows from the smaller step.
    remats = {'off': [False], 'on': [True], 'both': [True, False]}[args.remat]
    rows = []

    def report(framework: str, name: str, mode: str, remat: str, result: dict) -> None:
        flops = 2 * count_macs(name, args.image_size, **overrides) * result['global_batch']
        flops *= 3 if mode == 'train' else 1
        mfu = None
        if peak is not None:
            mfu = 100 * flops / result['step_s'] / (peak * result['devices'])
        row = {'framework': framework, 'model': name, 'mode': mode, 'remat': remat, **result}
        row.update(images_per_s=result['global_batch'] / result['step_s'], mfu_percent=mfu)
        rows.append(row)
        compile_s = '-' if result['compile_s'] is None else f'{result["compile_s"]:.1f}'
        print(
            f'{framework:<16}{name:<20}{mode:<10}{remat:<6}{result["global_batch"]:>6}'
            f'{row["images_per_s"]:>10.1f}{1000 * result["step_s"]:>10.1f}{compile_s:>10}'
            f'{_gib(result["peak_bytes"]):>9}{_gib(result["compiled_bytes"]):>9}'
            f'{"-" if mfu is None else f"{mfu:.1f}":>7}',
            flush=True,
        )

    if not args.no_torch:  # first, so that its cached GPU memory can be returned before JAX
        import torch

        variants = [('torch amp', False)] + (
            [] if args.no_torch_compile else [('torch.compile', True)]
        )
        for name in args.model:
            for framework, use_compile in variants:
                for mode in ('train', 'inference'):
                    try:
                        result = bench_torch(name, mode, use_compile, args, overrides)
                    except Exception as error:  # torch.compile may fail here: say so, go on
                        if not use_compile:
                            raise
                        print(f'{framework:<16}{name:<20}{mode:<10}failed: {error!r:.200}')
                        continue
                    report(framework, name, mode, '-', result)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    for name in args.model:
        params = init_flax_params(name, args, overrides)
        for remat in remats:
            result = bench_flax(name, 'train', remat, params, args, overrides)
            report('flax', name, 'train', 'on' if remat else 'off', result)
        result = bench_flax(name, 'inference', False, params, args, overrides)
        report('flax', name, 'inference', '-', result)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'args': vars(args), 'device': device.device_kind, 'rows': rows}, f, indent=2)


if __name__ == '__main__':
    main()
