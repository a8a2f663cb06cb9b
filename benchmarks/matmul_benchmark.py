"""The dense layers' matmuls of a CrossFormer train step, XLA:CPU against PyTorch, one by one.

For each stage of a variant at a batch size, the four dense layers of a block (qkv C -> 3C, proj
C -> C, fc1 C -> 4C, fc2 4C -> C, over M = batch x tokens rows) and the three products of each in
a train step: the forward `x @ W` (M x K x N), the input gradient `g @ W^T` and the kernel
gradient `x^T g`, contracted over all M tokens (what `crossformer.linear`'s VJP computes).
XLA: one `jax.jit` function per product; PyTorch: `F.linear`, `mm` and `t().mm()`, as autograd
calls them. Same float32 operands, same pinned CPUs, rounds alternating the two frameworks
(`cpu_benchmark.interleave`). Prints GFLOP/s per product (median over the rounds) and the
median per-round XLA/PyTorch speed ratio with its range, then the time of all the dense-layer
matmuls of one train step (each product times the stage's depth), per framework.

    python benchmarks/matmul_benchmark.py --model crossformer_small --batch 16 --rounds 7
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cpu_benchmark import fmt, interleave, pin_to_cpus, spread

PRODUCTS = ('forward', 'input grad', 'kernel grad')


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='crossformer_small', help='registered variant')
    parser.add_argument('--batch', type=int, default=16, help='images per train step')
    parser.add_argument('--image-size', type=int, default=224, help='square input side')
    parser.add_argument('--rounds', type=int, default=7, help='timed rounds (>= 5 for a median)')
    parser.add_argument('--warmup', type=int, default=1, help='untimed rounds after the first')
    parser.add_argument('--threads', type=int, default=2, help='CPUs for both frameworks')
    parser.add_argument('--overrides', default=None, help='JSON dict of model overrides')
    parser.add_argument('--json', default=None, help='also write the results to this file')
    args = parser.parse_args(argv)
    if args.image_size % 32:
        parser.error(f'--image-size must be a multiple of 32, found {args.image_size}')
    return args


def dense_layers(config: dict, batch: int, image_size: int) -> list[dict]:
    """Per stage and dense layer: stage, layer, depth (blocks), m (rows), k (in), n (out)."""
    from crossformer_jax.models.crossformer import CrossFormer

    layers = []
    for stage, depth in enumerate(config['depths']):
        side = image_size // (4 * 2**stage)
        dim = config['embed_dim'] * 2**stage
        hidden = int(dim * config.get('mlp_ratio', CrossFormer.mlp_ratio))
        for layer, k, n in (
            ('qkv', dim, 3 * dim),
            ('proj', dim, dim),
            ('fc1', dim, hidden),
            ('fc2', hidden, dim),
        ):
            layers.append(
                {
                    'stage': stage,
                    'layer': layer,
                    'depth': depth,
                    'm': batch * side**2,
                    'k': k,
                    'n': n,
                }
            )
    return layers


def product_steps(layer: dict, rng) -> dict[str, dict[str, object]]:
    """Blocking zero-argument steps per product and framework, on the same random operands."""
    import jax
    import numpy as np
    import torch
    import torch.nn.functional as F

    m, k, n = layer['m'], layer['k'], layer['n']
    x = rng.standard_normal((m, k), np.float32)
    kernel = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    grad = rng.standard_normal((m, n), np.float32)
    jx, jkernel, jgrad = (jax.numpy.asarray(a) for a in (x, kernel, grad))
    tx, tgrad = torch.from_numpy(x), torch.from_numpy(grad)
    tweight = torch.from_numpy(kernel.T.copy())  # torch.nn.Linear's (out, in) weight
    forward = jax.jit(lambda a, w: a @ w)
    input_grad = jax.jit(lambda g, w: g @ w.T)
    kernel_grad = jax.jit(lambda a, g: jax.lax.dot_general(a, g, (((0,), (0,)), ((), ()))))
    return {
        'forward': {
            'xla': lambda: forward(jx, jkernel).block_until_ready(),
            'pytorch': lambda: F.linear(tx, tweight),
        },
        'input grad': {
            'xla': lambda: input_grad(jgrad, jkernel).block_until_ready(),
            'pytorch': lambda: tgrad.mm(tweight),
        },
        'kernel grad': {
            'xla': lambda: kernel_grad(jx, jgrad).block_until_ready(),
            'pytorch': lambda: tgrad.t().mm(tx),
        },
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    cpus = pin_to_cpus(args.threads)  # before JAX and torch create their thread pools
    overrides = json.loads(args.overrides) if args.overrides else {}

    import jax
    import numpy as np
    import torch

    from crossformer_jax.models.crossformer import model_config

    torch.set_num_threads(len(cpus))
    torch.set_num_interop_threads(1)
    config = model_config(args.model, **overrides)
    rng = np.random.default_rng(0)
    print(
        f'{args.model}, batch {args.batch}, {args.image_size}x{args.image_size} float32, '
        f'{len(cpus)} threads (CPUs {cpus}), {args.rounds} rounds alternating XLA and PyTorch, '
        f'jax {jax.__version__}, torch {torch.__version__}, '
        f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}'
    )
    print(
        f'{"stage":<6}{"layer":<6}{"product":<13}{"M x K x N":<20}{"XLA GFLOP/s":>12}'
        f'{"PyTorch GFLOP/s":>17}  {"XLA/PyTorch [min-max]"}',
        flush=True,
    )
    rows = []
    step_seconds = {'xla': 0.0, 'pytorch': 0.0}
    for layer in dense_layers(config, args.batch, args.image_size):
        steps = product_steps(layer, rng)
        gflop = 2 * layer['m'] * layer['k'] * layer['n'] / 1e9  # the same for all three products
        for product in PRODUCTS:
            results = interleave(steps[product], args.rounds, args.warmup)
            rates = {
                name: spread([gflop / t for t in result['times_s']])
                for name, result in results.items()
            }
            ratio = spread(
                [
                    tp / tx
                    for tx, tp in zip(results['xla']['times_s'], results['pytorch']['times_s'])
                ]
            )
            for name, result in results.items():
                step_seconds[name] += layer['depth'] * statistics.median(result['times_s'])
            rows.append({**layer, 'product': product, **rates, 'ratio': ratio})
            shape = f'{layer["m"]}x{layer["k"]}x{layer["n"]}'
            print(
                f'{layer["stage"]:<6}{layer["layer"]:<6}{product:<13}{shape:<20}'
                f'{rates["xla"]["median"]:>12.0f}{rates["pytorch"]["median"]:>17.0f}  '
                f'{fmt(ratio)}x',
                flush=True,
            )
    print(
        f'dense-layer matmuls of one train step (each product x depth, medians): XLA '
        f'{step_seconds["xla"]:.2f} s, PyTorch {step_seconds["pytorch"]:.2f} s'
    )
    print('XLA/PyTorch = PyTorch time / XLA time per round (> 1: XLA faster)')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'args': vars(args), 'cpus': cpus, 'rows': rows, 'step_s': step_seconds}, f)


if __name__ == '__main__':
    main()
