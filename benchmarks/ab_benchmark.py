"""A/B speed of two versions of the model code (crossformer_jax/models/crossformer.py), in one
process.

Each side is a version of `crossformer_jax/models/crossformer.py`: a file path, or a git revision
whose
copy of that file is used (`HEAD`, `main`, a commit). Both versions are imported side by side
under their own module names, build the same variant with the same parameters and batch, and
are timed in alternating rounds (the order flips every round), so load from other processes hits
both. Reported: median images/s with min and max per side, the per-round B/A speed ratios
(median, min, max; > 1: B is faster), compile times, and the largest difference between the two
sides' outputs (inference logits, or train-step loss and gradients) as a parity check.

    python benchmarks/ab_benchmark.py --a HEAD --b crossformer_jax/models/crossformer.py \
        --model crossformer_tiny --mode train --batch 16 --rounds 9
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cpu_benchmark import (
    add_cpu_kernels_argument,
    add_malloc_argument,
    flax_forward,
    fmt,
    interleave,
    pin_to_cpus,
    set_cpu_kernels,
    set_malloc,
    summarize,
    version_of,
)

MODEL_FILE = 'crossformer_jax/models/crossformer.py'


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--a', default='HEAD', help=f'file or git revision of {MODEL_FILE}')
    parser.add_argument('--b', default=MODEL_FILE, help=f'file or git revision of {MODEL_FILE}')
    parser.add_argument('--model', default='crossformer_tiny')
    parser.add_argument('--mode', choices=('inference', 'train'), default='train')
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--image-size', type=int, default=224)
    parser.add_argument('--rounds', type=int, default=9)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--overrides', default=None, help='JSON dict of model overrides')
    add_malloc_argument(parser)
    add_cpu_kernels_argument(parser)
    return parser.parse_args(argv)


def load_model_module(spec: str, label: str):
    """Imports a version of the model code (file path or git revision) as module `label`, without
    adding its variants to the model registry (the package's own copy registered them)."""
    from crossformer_jax.models import registry

    with tempfile.TemporaryDirectory() as directory:
        path = version_of(spec, MODEL_FILE, directory)
        module_spec = importlib.util.spec_from_file_location(label, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[label] = module
        register = registry.register_model
        registry.register_model = lambda *args, **kwargs: None
        try:
            module_spec.loader.exec_module(module)
        finally:
            registry.register_model = register
    return module


def build_classifier(module, name: str, **overrides):
    """The classifier `name` of a loaded version of the model code (older versions named their
    builder create_model)."""
    build = getattr(module, 'build_classifier', None) or module.create_model
    return build(name, **overrides)


def make_step(model, params, images, labels, mode: str):
    """(blocking step for timing, function returning the outputs compared between A and B)."""
    import jax
    import optax

    if mode == 'inference':
        forward = flax_forward(model)
        return (lambda: forward(params, images).block_until_ready()), (
            lambda: {'logits': forward(params, images)}
        )

    def loss_fn(params, key):
        logits = model.apply({'params': params}, images, train=True, rngs={'dropout': key})
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grad_step = jax.jit(jax.value_and_grad(loss_fn))
    key = jax.random.key(1)

    def outputs():
        loss, grads = grad_step(params, key)
        return {'loss': loss, **{jax.tree_util.keystr(p): g for p, g in _leaves(grads)}}

    return (lambda: jax.block_until_ready(grad_step(params, key))), outputs


def _leaves(tree):
    import jax

    return jax.tree_util.tree_flatten_with_path(tree)[0]


def main(argv=None) -> None:
    args = parse_args(argv)
    cpus = pin_to_cpus(args.threads)
    set_malloc(args.malloc)
    set_cpu_kernels(args.cpu_kernels)
    overrides = json.loads(args.overrides) if args.overrides else {}

    import jax
    import numpy as np

    modules = {'A': load_model_module(args.a, 'model_a'), 'B': load_model_module(args.b, 'model_b')}
    models = {side: build_classifier(m, args.model, **overrides) for side, m in modules.items()}
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch, args.image_size, args.image_size, 3), np.float32)
    labels = rng.integers(0, models['A'].num_classes, (args.batch,))
    params = jax.jit(models['A'].init)(jax.random.key(0), images[:1])['params']
    steps, outputs = {}, {}
    for side, model in models.items():
        steps[side], outputs[side] = make_step(model, params, images, labels, args.mode)
    results = interleave(steps, args.rounds, args.warmup)
    summary = summarize(results, args.batch, 'B', 'A')
    out_a, out_b = outputs['A'](), outputs['B']()
    worst = max(
        (
            float(np.max(np.abs(np.asarray(out_a[k]) - np.asarray(out_b[k]))))
            / max(float(np.max(np.abs(np.asarray(out_a[k])))), 1e-30),
            k,
        )
        for k in out_a
    )
    print(
        f'{args.model} {args.mode} batch {args.batch} {args.image_size}px, {len(cpus)} threads, '
        f'{args.rounds} rounds, malloc {args.malloc}; A = {args.a}, B = {args.b}'
    )
    for side in 'AB':
        print(
            f'{side}: {fmt(summary[side]["images_per_s"])} img/s, '
            f'compile {summary[side]["compile_s"]:.1f} s'
        )
    print(f'B/A speed: {fmt(summary["ratio"])}x   per round: ', end='')
    print(' '.join(f'{ta / tb:.2f}' for ta, tb in zip(*(results[s]['times_s'] for s in 'AB'))))
    print(f'largest relative difference A vs B: {worst[0]:.2e} ({worst[1]})')


if __name__ == '__main__':
    main()
