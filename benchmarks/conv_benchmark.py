"""A/B speed of the convolution custom calls: this checkout's kernels against another version.

The other side is another version of `crossformer_jax/cpu/kernels.cc` (a file path, or a git
revision whose copy is used), built beside this one and registered under its own FFI target
names. The shapes are the convolutions a variant's forward pass runs at the given batch (read
from its jaxpr: the cross-scale embeddings and the merges). Per shape, the forward convolution
and the kernel gradient of both versions are timed in alternating rounds (the order flips every
round); reported: median ms per side and the per-round speed ratio (other time / this time,
> 1: this checkout is faster) with min and max, and the largest difference between the two
results relative to their largest magnitude.

    python benchmarks/conv_benchmark.py --against HEAD --model crossformer_tiny --batch 32
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cpu_benchmark import (
    add_malloc_argument,
    fmt,
    interleave,
    pin_to_cpus,
    set_malloc,
    spread,
    version_of,
)

SOURCE_FILE = 'crossformer_jax/cpu/kernels.cc'
SUFFIX = '_against'


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--against', default='HEAD', help=f'file or git revision of {SOURCE_FILE}')
    parser.add_argument('--model', default='crossformer_tiny')
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--image-size', type=int, default=224)
    parser.add_argument('--rounds', type=int, default=7)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--overrides', default=None, help='JSON dict of model overrides')
    add_malloc_argument(parser)
    return parser.parse_args(argv)


def conv_shapes(model, images) -> list[tuple]:
    """(x shape, kernel shape, stride, padding) of each distinct forward convolution custom call
    in the model's forward pass, in the order the model runs them."""
    import jax

    from crossformer_jax.cpu import kernels as cpu_kernels

    params = jax.eval_shape(model.init, jax.random.key(0), images)
    closed = jax.make_jaxpr(model.apply)(params, images)
    shapes = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.params.get('target_name') == cpu_kernels.CONV_FORWARD:
                attributes = dict(eqn.params['attributes'])
                shape = (
                    *(tuple(v.aval.shape) for v in eqn.invars),
                    int(attributes['stride']),
                    int(attributes['padding']),
                )
                if shape not in shapes:
                    shapes.append(shape)
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if hasattr(sub, 'jaxpr'):
                        walk(sub.jaxpr)
                    elif hasattr(sub, 'eqns'):
                        walk(sub)

    walk(closed.jaxpr)
    return shapes


def conv_calls(suffix: str, kernel_size: int, stride: int, padding: int):
    """Jitted (forward(x, kernel), kernel_gradient(x, grad)) of the targets named + suffix."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from crossformer_jax.cpu import kernels as cpu_kernels

    attributes = {'stride': np.int64(stride), 'padding': np.int64(padding)}

    def forward(x, kernel):
        shape = cpu_kernels.conv_output_shape(
            x.shape, kernel_size, kernel.shape[-1], stride, padding
        )
        out = jax.ShapeDtypeStruct(shape, jnp.float32)
        return jax.ffi.ffi_call(cpu_kernels.CONV_FORWARD + suffix, out)(x, kernel, **attributes)

    def kernel_gradient(x, grad):
        out = jax.ShapeDtypeStruct((kernel_size, kernel_size, x.shape[-1], grad.shape[-1]), x.dtype)
        target = cpu_kernels.CONV_KERNEL_GRADIENT + suffix
        return jax.ffi.ffi_call(target, out)(x, grad, **attributes)

    return jax.jit(forward), jax.jit(kernel_gradient)


def run(call, operands) -> None:
    call(*operands).block_until_ready()


def main(argv=None) -> None:
    args = parse_args(argv)
    cpus = pin_to_cpus(args.threads)
    set_malloc(args.malloc)

    import jax.numpy as jnp
    import numpy as np

    from crossformer_jax import cpu, models
    from crossformer_jax.cpu import kernels as cpu_kernels

    cpu.enable(strict=True)
    with tempfile.TemporaryDirectory() as directory:
        source = version_of(args.against, SOURCE_FILE, directory)
        cpu_kernels.register_extension(cpu_kernels.build_extension(source), SUFFIX)
    overrides = json.loads(args.overrides) if args.overrides else {}
    model = models.create_model(args.model, **overrides)
    images = jnp.zeros((args.batch, args.image_size, args.image_size, 3), jnp.float32)
    print(
        f'{args.model}, batch {args.batch}, {args.image_size}x{args.image_size}, {len(cpus)} '
        f'threads, {args.rounds} rounds alternating this checkout and {args.against}'
    )
    print(
        f'{"x":<20}{"kernel":<18}{"s":>2}{"p":>3}  {"pass":<8}{"this ms":>9}{"other ms":>10}  '
        f'{"ratio [min-max]":<20}{"max rel diff":>12}'
    )
    rng = np.random.default_rng(0)
    for x_shape, kernel_shape, stride, padding in conv_shapes(model, images):
        x = jnp.asarray(rng.standard_normal(x_shape, np.float32))
        kernel = jnp.asarray(rng.standard_normal(kernel_shape, np.float32))
        this = conv_calls('', kernel_shape[0], stride, padding)
        other = conv_calls(SUFFIX, kernel_shape[0], stride, padding)
        grad = jnp.asarray(rng.standard_normal(this[0](x, kernel).shape, np.float32))
        for index, (name, operands) in enumerate((('forward', (x, kernel)), ('kgrad', (x, grad)))):
            results = interleave(
                {
                    side: functools.partial(run, calls[index], operands)
                    for side, calls in (('this', this), ('other', other))
                },
                args.rounds,
                args.warmup,
            )
            times = {side: results[side]['times_s'] for side in results}
            ratios = spread([o / t for t, o in zip(times['this'], times['other'])])
            a, b = np.asarray(this[index](*operands)), np.asarray(other[index](*operands))
            difference = np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)
            print(
                f'{x_shape!s:<20}{kernel_shape!s:<18}{stride:>2}{padding:>3}  {name:<8}'
                f'{1e3 * spread(times["this"])["median"]:>9.1f}'
                f'{1e3 * spread(times["other"])["median"]:>10.1f}  {fmt(ratios) + "x":<20}'
                f'{difference:>12.1e}',
                flush=True,
            )
    print('ratio = other version time / this checkout time per round (> 1: this one faster)')


if __name__ == '__main__':
    main()
