"""CPU speed of the Flax CrossFormer against the PyTorch reference: one process, rounds alternate.

Both frameworks get the same weights (the PyTorch model's random initialisation, converted with
`crossformer_jax.convert_torch_state_dict`), the same random batch, and the same CPUs. A round
times one Flax step and one PyTorch step (the order flips every round), so load from other
processes hits both; the report gives, per framework, the median images/s over the rounds with
min and max, and the Flax/PyTorch ratio as the median, min and max of the per-round ratios.

Modes: `inference` (jit-compiled forward / `torch.inference_mode` forward, default batch 32) and
`train` (forward with stochastic depth on, mean cross-entropy, backward, AdamW update: one
jit-compiled `optax.adamw` step with donated buffers / `torch.optim.AdamW.step`; default batch
16), float32.

Threads: before JAX or torch is imported the process is pinned (`sched_setaffinity`) to the first
`--threads` usable CPUs. XLA's CPU client sizes its thread pools from the CPUs the process may run
on, so the pinning is what bounds XLA; torch gets `torch.set_num_threads(threads)` and one
inter-op thread.

    python benchmarks/cpu_benchmark.py --model crossformer_tiny crossformer_small --threads 2
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

MODES = ('inference', 'train')
DEFAULT_BATCH = {'inference': 32, 'train': 16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', nargs='+', default=['crossformer_tiny'], help='variant name(s)')
    parser.add_argument('--mode', choices=(*MODES, 'both'), default='both')
    parser.add_argument('--inference-batch', type=int, default=DEFAULT_BATCH['inference'])
    parser.add_argument('--train-batch', type=int, default=DEFAULT_BATCH['train'])
    parser.add_argument('--image-size', type=int, default=224, help='square input side')
    parser.add_argument('--rounds', type=int, default=7, help='timed rounds (>= 5 for a median)')
    parser.add_argument('--warmup', type=int, default=1, help='untimed rounds after the first')
    parser.add_argument(
        '--threads', type=int, default=2, help='CPUs (and compute threads) for both frameworks'
    )
    parser.add_argument('--json', default=None, help='also write the results to this file')
    parser.add_argument(
        '--overrides',
        default=None,
        help='JSON dict of model overrides (e.g. a tiny config for tests), given to both models',
    )
    add_malloc_argument(parser)
    add_cpu_kernels_argument(parser)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f'--rounds must be >= 1, found {args.rounds}')
    return args


def add_malloc_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        '--malloc',
        choices=('keep', 'default'),
        default='keep',
        help='keep: glibc keeps freed memory for reuse (crossformer_jax.cpu.host_memory), for both '
        "sides; default: glibc's own behaviour",
    )


def add_cpu_kernels_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        '--cpu-kernels',
        choices=('on', 'off'),
        default='on',
        help='on: the Flax side runs with the XLA:CPU plug-in (crossformer_jax.cpu.enable); off: '
        'plain JAX',
    )


def set_cpu_kernels(choice: str) -> None:
    """Applies --cpu-kernels before any model is traced (a failed build is an error here)."""
    if choice == 'on':
        from crossformer_jax import cpu

        cpu.enable(strict=True)


def set_malloc(choice: str) -> None:
    """Applies --malloc; call before JAX or torch starts (crossformer_jax/cpu/host_memory.py)."""
    if choice == 'keep':
        from crossformer_jax.cpu.host_memory import keep_freed_memory

        keep_freed_memory()


def version_of(spec: str, path: str, directory: str) -> Path:
    """A version of the repository file `path` (for the A/B benchmarks): the file `spec`, or git
    revision spec's copy of `path`, written into `directory`."""
    if os.path.isfile(spec):
        return Path(spec)
    result = subprocess.run(['git', 'show', f'{spec}:{path}'], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(
            f'{spec!r} is neither a file nor a git revision with {path}: {result.stderr.strip()}'
        )
    copy = Path(directory) / Path(path).name
    copy.write_text(result.stdout)
    return copy


def pin_to_cpus(threads: int) -> list[int]:
    """Restricts this process to the first `threads` usable CPUs; returns the CPUs kept."""
    usable = sorted(os.sched_getaffinity(0))
    if not 1 <= threads <= len(usable):
        raise SystemExit(f'--threads must be in [1, {len(usable)}], found {threads}')
    os.sched_setaffinity(0, usable[:threads])
    return usable[:threads]


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of `values`."""
    return {'median': statistics.median(values), 'min': min(values), 'max': max(values)}


def interleave(
    steps: dict[str, Callable[[], None]], rounds: int, warmup: int
) -> dict[str, dict[str, object]]:
    """Times each blocking step once per round, the order reversed every other round.

    Returns per name: 'first_s' (the first call: tracing and compilation included) and 'times_s'
    (one entry per timed round).
    """
    names = list(steps)
    results = {name: {'times_s': []} for name in names}
    for name in names:
        start = time.perf_counter()
        steps[name]()
        results[name]['first_s'] = time.perf_counter() - start
    for r in range(warmup + rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            steps[name]()
            if r >= warmup:
                results[name]['times_s'].append(time.perf_counter() - start)
    return results


def summarize(results: dict[str, dict], batch: int, a: str, b: str) -> dict[str, object]:
    """Images/s spread per name and the per-round a/b speed ratios (> 1: a is faster)."""
    summary = {}
    for name, result in results.items():
        summary[name] = {
            'images_per_s': spread([batch / t for t in result['times_s']]),
            'first_s': result['first_s'],
            'compile_s': max(result['first_s'] - statistics.median(result['times_s']), 0.0),
        }
    ratios = [tb / ta for ta, tb in zip(results[a]['times_s'], results[b]['times_s'])]
    summary['ratio'] = spread(ratios)
    return summary


def flax_train_step(model, optimizer):
    """A jit-compiled AdamW step (params, opt_state, images, labels, key) -> (params, state, loss),
    with parameters and optimiser state donated."""
    import jax
    import optax

    def loss_fn(params, images, labels, key):
        logits = model.apply({'params': params}, images, train=True, rngs={'dropout': key})
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def train_step(params, opt_state, images, labels, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(train_step, donate_argnums=(0, 1))


def flax_forward(model):
    """The jit-compiled inference forward (params, images) -> logits, with the compiler options
    that the trainer's evaluation and predict.py use."""
    import jax

    from crossformer_jax.runtime.compile_options import inference_compiler_options

    return jax.jit(
        lambda params, images: model.apply({'params': params}, images),
        compiler_options=inference_compiler_options(),
    )


def flax_steps(model, params, images, labels, mode: str) -> Callable[[], None]:
    """A blocking zero-argument step of `mode` for a Flax model (state kept in a closure)."""
    import jax
    import optax

    if mode == 'inference':
        forward = flax_forward(model)
        return lambda: forward(params, images).block_until_ready()
    optimizer = optax.adamw(learning_rate=1e-3, weight_decay=0.05)
    train_step = flax_train_step(model, optimizer)
    params = jax.tree.map(jax.numpy.array, params)  # own buffers: the step donates them
    state = {'params': params, 'opt_state': optimizer.init(params), 'key': jax.random.key(1)}

    def step():
        state['key'], key = jax.random.split(state['key'])
        state['params'], state['opt_state'], loss = train_step(
            state['params'], state['opt_state'], images, labels, key
        )
        loss.block_until_ready()

    return step


def torch_steps(model, images, labels, mode: str) -> Callable[[], None]:
    """A blocking zero-argument step of `mode` for a PyTorch model."""
    import torch
    import torch.nn.functional as F

    if mode == 'inference':
        model.eval()

        def forward():
            with torch.inference_mode():
                model(images)

        return forward
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    return step


def benchmark(name: str, mode: str, batch: int, args, overrides: dict) -> dict[str, object]:
    """Flax vs. PyTorch for one variant and mode, interleaved; see `summarize`."""
    import jax
    import numpy as np
    import torch

    from crossformer_jax import convert_torch_state_dict, create_model
    from crossformer_jax.reference.crossformer import create_torch_model

    torch.manual_seed(0)
    torch_model = create_torch_model(name, **overrides)
    params = jax.tree.map(
        jax.numpy.asarray,
        convert_torch_state_dict(torch_model.state_dict(), name, **overrides)['params'],
    )
    model = create_model(name, **overrides)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, args.image_size, args.image_size, 3), np.float32)
    labels = rng.integers(0, model.num_classes, (batch,))
    steps = {
        'flax': flax_steps(
            model, params, jax.numpy.asarray(images), jax.numpy.asarray(labels), mode
        ),
        'pytorch': torch_steps(
            torch_model,
            torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
            torch.from_numpy(labels),
            mode,
        ),
    }
    results = interleave(steps, args.rounds, args.warmup)
    return {'raw': results, **summarize(results, batch, 'flax', 'pytorch')}


def fmt(s: dict[str, float]) -> str:
    return f'{s["median"]:.2f} [{s["min"]:.2f}-{s["max"]:.2f}]'


def main(argv=None) -> None:
    args = parse_args(argv)
    cpus = pin_to_cpus(args.threads)  # before JAX and torch create their thread pools
    set_malloc(args.malloc)  # for both frameworks
    set_cpu_kernels(args.cpu_kernels)
    overrides = json.loads(args.overrides) if args.overrides else {}
    modes = MODES if args.mode == 'both' else (args.mode,)

    import jax
    import torch

    torch.set_num_threads(len(cpus))
    torch.set_num_interop_threads(1)
    print(
        f'{args.image_size}x{args.image_size} float32, {len(cpus)} threads (CPUs {cpus}), '
        f'{args.rounds} rounds alternating Flax and PyTorch, malloc {args.malloc}, '
        f'CPU kernels {args.cpu_kernels}, '
        f'jax {jax.__version__}, '
        f'torch {torch.__version__}, {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}'
    )
    header = (
        f'{"model":<20}{"mode":<11}{"batch":>6}  {"Flax img/s [min-max]":<24}'
        f'{"PyTorch img/s [min-max]":<24}{"ratio [min-max]":<20}{"compile s":>10}'
    )
    print(header, flush=True)
    rows = []
    for name in args.model:
        for mode in modes:
            batch = args.inference_batch if mode == 'inference' else args.train_batch
            result = benchmark(name, mode, batch, args, overrides)
            gc.collect()
            rows.append({'model': name, 'mode': mode, 'batch': batch, **result})
            print(
                f'{name:<20}{mode:<11}{batch:>6}  {fmt(result["flax"]["images_per_s"]):<24}'
                f'{fmt(result["pytorch"]["images_per_s"]):<24}{fmt(result["ratio"]) + "x":<20}'
                f'{result["flax"]["compile_s"]:>10.1f}',
                flush=True,
            )
    print('ratio = Flax images/s / PyTorch images/s per round (> 1: Flax faster)')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'args': vars(args), 'cpus': cpus, 'rows': rows}, f, indent=2)


if __name__ == '__main__':
    main()
