"""CPU throughput of the Flax CrossFormer against the PyTorch reference, in one process.

For each framework and mode it reports images/s (batch size / median step time) and, for Flax,
the compile time (first call minus the median step). Inference is a jit-compiled forward in Flax
and an ``inference_mode`` forward in PyTorch; a train step is forward, cross-entropy, backward and
an AdamW update (``optax.adamw`` jit-compiled with donated buffers; ``torch.optim.AdamW``), with
stochastic depth on as in training.

Threads: the process is pinned to ``--threads`` CPUs (``sched_setaffinity``) before JAX or torch
is imported. XLA's CPU client sizes its thread pools from the CPUs the process may run on, so this
is what limits XLA; torch additionally gets ``torch.set_num_threads(threads)``.

    python benchmarks/cpu_benchmark.py --model crossformer_small --batch-size 16 --threads 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='crossformer_tiny', help='a name from VARIANTS')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--image-size', type=int, default=224, help='square input side')
    parser.add_argument('--mode', choices=('inference', 'train', 'both'), default='both')
    parser.add_argument('--iters', type=int, default=10, help='timed steps per measurement')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps after the first')
    parser.add_argument(
        '--threads', type=int, default=None, help='CPUs for both frameworks (default: all usable)'
    )
    parser.add_argument('--json', default=None, help='also write the results to this file')
    return parser.parse_args()


def pin_to_cpus(threads: int | None) -> list[int]:
    """Restricts this process to the first `threads` usable CPUs; returns the CPUs kept."""
    usable = sorted(os.sched_getaffinity(0))
    if threads is None:
        return usable
    if not 1 <= threads <= len(usable):
        raise SystemExit(f'--threads must be in [1, {len(usable)}], found {threads}')
    os.sched_setaffinity(0, usable[:threads])
    return usable[:threads]


def time_steps(step, iters: int, warmup: int) -> dict[str, float]:
    """Runs `step()` (which must block until done) 1 + warmup + iters times; seconds."""
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {'first_s': first, 'median_s': statistics.median(times)}


def benchmark_flax(args: argparse.Namespace, modes: list[str]) -> dict[str, dict[str, float]]:
    import jax
    import optax

    from crossformer_jax import create_model

    model = create_model(args.model)
    key_params, key_images, key_labels, key_dropout = jax.random.split(jax.random.PRNGKey(0), 4)
    shape = (args.batch_size, args.image_size, args.image_size, 3)
    images = jax.random.normal(key_images, shape)
    labels = jax.random.randint(key_labels, (args.batch_size,), 0, model.num_classes)
    params = jax.jit(model.init)(key_params, images[:1])['params']
    results = {}

    if 'inference' in modes:
        forward = jax.jit(lambda params, images: model.apply({'params': params}, images))
        results['inference'] = time_steps(
            lambda: forward(params, images).block_until_ready(), args.iters, args.warmup
        )

    if 'train' in modes:
        optimizer = optax.adamw(learning_rate=1e-3, weight_decay=0.05)

        def loss_fn(params, images, labels, key):
            logits = model.apply({'params': params}, images, train=True, rngs={'dropout': key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        def train_step(params, opt_state, images, labels, key):
            loss, grads = jax.value_and_grad(loss_fn)(params, images, labels, key)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        train_step = jax.jit(train_step, donate_argnums=(0, 1))
        state = {'params': params, 'opt_state': optimizer.init(params), 'key': key_dropout}

        def step():
            state['key'], key = jax.random.split(state['key'])
            state['params'], state['opt_state'], loss = train_step(
                state['params'], state['opt_state'], images, labels, key
            )
            loss.block_until_ready()

        results['train'] = time_steps(step, args.iters, args.warmup)

    for result in results.values():
        result['compile_s'] = max(result['first_s'] - result['median_s'], 0.0)
    return results


def benchmark_torch(
    args: argparse.Namespace, modes: list[str], threads: int
) -> dict[str, dict[str, float]]:
    import torch
    import torch.nn.functional as F

    from crossformer_jax.torch_reference import create_torch_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_torch_model(args.model)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    labels = torch.randint(0, model.head.out_features, (args.batch_size,))
    results = {}

    if 'inference' in modes:
        model.eval()

        def forward():
            with torch.inference_mode():
                model(images)

        results['inference'] = time_steps(forward, args.iters, args.warmup)

    if 'train' in modes:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)

        def step():
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()

        results['train'] = time_steps(step, args.iters, args.warmup)
    return results


def main() -> None:
    args = parse_args()
    cpus = pin_to_cpus(args.threads)  # before JAX and torch create their thread pools
    modes = ['inference', 'train'] if args.mode == 'both' else [args.mode]

    import jax
    import torch

    results = {
        'flax': benchmark_flax(args, modes),
        'pytorch': benchmark_torch(args, modes, threads=len(cpus)),
    }

    print(
        f'{args.model}, batch {args.batch_size}, {args.image_size}x{args.image_size}, '
        f'{len(cpus)} threads (CPUs {cpus}), jax {jax.__version__}, torch {torch.__version__}'
    )
    print(f'{"framework":<10}{"mode":<11}{"images/s":>10}{"step ms":>10}{"compile s":>11}')
    for framework, by_mode in results.items():
        for mode, result in by_mode.items():
            result['images_per_s'] = args.batch_size / result['median_s']
            compile_s = f'{result["compile_s"]:.1f}' if 'compile_s' in result else '-'
            print(
                f'{framework:<10}{mode:<11}{result["images_per_s"]:>10.1f}'
                f'{1000 * result["median_s"]:>10.1f}{compile_s:>11}'
            )
    ratios = {
        mode: results['flax'][mode]['images_per_s'] / results['pytorch'][mode]['images_per_s']
        for mode in modes
    }
    print('Flax/PyTorch speed: ' + ', '.join(f'{m} {r:.2f}x' for m, r in ratios.items()))

    if args.json:
        with open(args.json, 'w') as f:
            json.dump(
                {'args': vars(args), 'cpus': cpus, 'results': results, 'ratios': ratios},
                f,
                indent=2,
            )


if __name__ == '__main__':
    main()
