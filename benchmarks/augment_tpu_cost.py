"""Cost of the device-side batch transform of classification training in a TPU program.

Compiles `ClassificationTask.transform_batch` (RandAugment, normalisation, random erasing, mixup)
ahead of time for the devices of a TPU slice (`crossformer_jax.training.aot.describe_topology`:
libtpu, no TPU needed), on a global uint8 batch split over a 1-D mesh 'data', with the data and
mixup config of `configs/crossformer_tiny.py`, and prints XLA:TPU's per-device FLOPs, bytes
accessed and temporaries.

XLA's cost analysis counts the body of a loop once, and RandAugment loops over the examples
of each device (`lax.map`), so the compiled program's FLOPs and bytes cover one image and are
not the step's. The script therefore also prints an expected value per step: the transform
without RandAugment, plus images per device x layers x the mean cost of one layer on one
image (each op of the recipe compiled alone on one image, weighted by its probability, with
the cost of an op not applied), and a worst case (every layer of every image the op with the
highest FLOPs, respectively bytes). Temporaries are the compiled program's: the loop reuses its
buffers from one image to the next.

    JAX_PLATFORMS=cpu python benchmarks/augment_tpu_cost.py --topology v5e:2x2 --batch 64
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GIB = 2**30


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--topology', default='v5e:2x2', help='TPU slice, e.g. v5e:2x2, v4:2x2x1')
    parser.add_argument('--batch', type=int, default=64, help='global batch (224x224x3 uint8)')
    parser.add_argument('--image-size', type=int, default=224, help='square image side')
    return parser.parse_args(argv)


def cost(fn, *args, out_shardings=None) -> dict:
    """GFLOP, GB accessed and GiB of temporaries per device of `fn` compiled for `args`."""
    import jax

    start = time.perf_counter()
    compiled = jax.jit(fn, out_shardings=out_shardings).lower(*args).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return {
        'gflop': analysis.get('flops', 0.0) / 1e9,
        'gb': analysis.get('bytes accessed', 0.0) / 1e9,
        'temp_gib': compiled.memory_analysis().temp_size_in_bytes / GIB,
        'compile_s': time.perf_counter() - start,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from configs import common
    from crossformer_jax.augment import batch_ops, randaugment
    from crossformer_jax.tasks.classification import ClassificationTask
    from crossformer_jax.training import aot

    devices = aot.describe_topology(args.topology).devices
    mesh = Mesh(np.asarray(devices), ('data',))
    if args.batch % len(devices):
        raise SystemExit(f'--batch {args.batch} is not divisible by {len(devices)} devices')
    config = common.get_config('crossformer_tiny')
    size = args.image_size

    def transform_cost(data_config) -> dict:
        task = ClassificationTask(num_classes=1000, mixup=config.mixup, data=data_config)
        split, whole = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
        batch = {
            'image': jax.ShapeDtypeStruct((args.batch, size, size, 3), jnp.uint8, sharding=split),
            'label': jax.ShapeDtypeStruct((args.batch,), jnp.int32, sharding=split),
        }
        rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=whole)
        return cost(
            lambda rng, batch: task.transform_batch(rng, batch, mesh),
            rng,
            batch,
            out_shardings={'image': split, 'target': split},
        )

    def op_cost(chosen: int) -> dict:
        """One layer on one image (each device the same), op `ra_config.ops[chosen]`."""
        whole = NamedSharding(mesh, P())
        image = jax.ShapeDtypeStruct((size, size, 3), jnp.float32, sharding=whole)
        scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=whole)
        return cost(
            lambda image, magnitude, sign: randaugment.apply_op(
                image, jnp.int32(chosen), magnitude, sign, ra_config.ops, fill
            ),
            image,
            scalar,
            scalar,
        )

    ra_config = batch_ops.randaugment_config(config.data)
    fill = jnp.asarray(batch_ops.randaugment_fill(config.data), jnp.float32)
    compiled = transform_cost(config.data)
    without = config.data.copy_and_resolve_references()
    without.randaugment = ''
    rest = transform_cost(without)
    ops = {name: op_cost(i) for i, name in enumerate(ra_config.ops)}
    none = op_cost(len(ra_config.ops))
    images = args.batch // len(devices)

    def expected(field: str) -> float:
        per_op = np.mean([c[field] for c in ops.values()])
        layer = ra_config.prob * per_op + (1 - ra_config.prob) * none[field]
        return rest[field] + images * ra_config.num_layers * layer

    def worst(field: str) -> float:
        return rest[field] + images * ra_config.num_layers * max(c[field] for c in ops.values())

    print(
        f'{args.topology} ({len(devices)} x {devices[0].device_kind}), global batch {args.batch} '
        f'of {size}x{size}x3 uint8, per device; RandAugment {config.data.randaugment!r}'
    )
    print(f'{"program":52s} {"GFLOP":>8s} {"GB":>8s} {"temp GiB":>9s} {"compile s":>10s}')
    rows = [
        ('transform_batch, as compiled (loop body once)', compiled),
        ('transform_batch without RandAugment', rest),
        *((f'  one layer, one image: {name}', c) for name, c in ops.items()),
        ('  one layer, one image: not applied', none),
    ]
    for name, c in rows:
        print(
            f'{name:52s} {c["gflop"]:8.3f} {c["gb"]:8.3f} {c["temp_gib"]:9.4f} '
            f'{c["compile_s"]:10.1f}'
        )
    for name, total in (('expected', expected), ('worst case (costliest op)', worst)):
        print(
            f'{"transform_batch per step, " + name:52s} {total("gflop"):8.3f} '
            f'{total("gb"):8.3f} {compiled["temp_gib"]:9.4f}'
        )


if __name__ == '__main__':
    main()
