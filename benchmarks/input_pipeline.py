"""Images/s of the training and evaluation input pipelines, stage by stage, on pinned cores,
beside the original PyTorch loader on the same cores.

Rows:

* ``decode only``: read + decode of every training image (a plain tf.data map);
* ``+ crop/flip``: ``create_train_iterator`` with the full recipe, i.e. everything the host does:
  decode, random resized crop window, PIL bicubic resize, flip, uint8 batches;
* ``device: + RandAugment``: ``batch_ops.train_images`` without random erasing (RandAugment and
  normalisation) on uint8 batches, with JAX on the same cores, as the train step runs it;
* ``device: + erasing``: the whole device part of the recipe;
* ``original loader``: the CrossFormer code's training loader (timm's transform on PIL images:
  crop, flip, RandAugment, ToTensor, Normalize, RandomErasing) in a torch DataLoader with one
  worker process per core (``benchmarks/reference_loader.py``, PIL and torch only);
* ``eval``: ``create_eval_iterator`` (resize short side, centre crop).

The process is pinned to ``--cores`` CPUs (``os.sched_setaffinity``, inherited by the loader's
workers) before TensorFlow is imported, and tf.data runs on a private threadpool of that size.
Every row is measured ``--rounds`` times, rounds alternating over the rows (the order reversed
every other round), on a fresh iterator each time (one untimed warm-up batch, then ``--batches``
timed batches). The table gives the median and range of images/s and, for the rows that run in
this process, the median images per CPU-second (the work one image costs). The last line is the
median and range of the per-round ratio of the host pipeline to the original loader.

Without ``--data-dir``/``--tfds`` it writes an ImageNet-like folder (``--images`` JPEGs of
500x375 / 375x500, random crops and resizes of scikit-learn's two sample photos) to
``--make-dir`` and measures on that::

    python benchmarks/input_pipeline.py --cores 2
    python benchmarks/input_pipeline.py --cores 8 --data-dir /data/imagenet_folder
    python benchmarks/input_pipeline.py --cores 8 --tfds imagenet2012 --tfds-data-dir ~/tfds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--cores', type=int, default=2, help='CPUs the process is pinned to')
    parser.add_argument('--data-dir', default='', help='image folder root (<split>/<class>/*)')
    parser.add_argument('--tfds', default='', help='a prepared TFDS dataset name instead')
    parser.add_argument('--tfds-data-dir', default='', help='TFDS data_dir for --tfds')
    parser.add_argument('--train-split', default='train')
    parser.add_argument('--eval-split', default='validation')
    parser.add_argument(
        '--make-dir', default='/tmp/crossformer_input_benchmark', help='where to write the folder'
    )
    parser.add_argument('--images', type=int, default=640, help='training images to write')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--batches', type=int, default=8, help='timed batches per measurement')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument(
        '--stages',
        default='decode,host,device_randaugment,device,reference,eval',
        help='comma-separated rows (reference needs torch; --data-dir or the generated folder)',
    )
    return parser.parse_args()


def pin(cores: int) -> list[int]:
    available = sorted(os.sched_getaffinity(0))
    if cores > len(available):
        raise SystemExit(f'--cores {cores} but only {len(available)} CPUs are usable')
    chosen = available[:cores]
    os.sched_setaffinity(0, chosen)
    return chosen


def make_folder(root: str, num_train: int) -> str:
    """ImageNet-like JPEGs (quality 90) from the two scikit-learn sample photos; reused if
    present. Train: ``num_train`` images in 2 classes; validation: a quarter as many."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    marker = os.path.join(root, f'.complete_{num_train}')
    if os.path.exists(marker):
        return root
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.RandomState(0)
    for split, count in (('train', num_train), ('validation', max(num_train // 4, 1))):
        for i in range(count):
            photo = photos[i % 2]
            w, h = photo.size
            cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
            left, top = rng.randint(0, w - cw + 1), rng.randint(0, h - ch + 1)
            size = (500, 375) if rng.rand() < 0.75 else (375, 500)
            image = photo.crop((left, top, left + cw, top + ch)).resize(size, Image.BICUBIC)
            class_dir = os.path.join(root, split, f'class{i % 2}')
            os.makedirs(class_dir, exist_ok=True)
            image.save(os.path.join(class_dir, f'{i:05d}.jpg'), quality=90)
    open(marker, 'w').close()
    return root


def data_config(args, root: str, **overrides):
    """The training recipe's data config (DATA_DEFAULTS), smaller TFDS shuffle groups."""
    import ml_collections

    from crossformer_jax.data.config import DATA_DEFAULTS

    cfg = dict(
        DATA_DEFAULTS,
        shuffle_buffer=1024,
        train_split=args.train_split,
        eval_split=args.eval_split,
    )
    if args.tfds:
        cfg.update(dataset=args.tfds, data_dir=args.tfds_data_dir)
    else:
        cfg.update(dataset='image_folder', data_dir=root)
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def decode_only_batches(args, root: str, cores: int):
    """Iterator over batches of decoded images' sizes (decode work only, no augmentation)."""
    import tensorflow as tf

    from crossformer_jax.data import preprocess_ops as ops

    if args.tfds:
        import tensorflow_datasets as tfds

        builder = tfds.builder(args.tfds, data_dir=args.tfds_data_dir or None)
        ds = builder.as_dataset(
            args.train_split, decoders={'image': tfds.decode.SkipDecoding()}, shuffle_files=False
        )
        ds = ds.map(lambda ex: ex['image'])
    else:
        files = [path for path, _ in folder_files(root, args.train_split)]
        ds = tf.data.Dataset.from_tensor_slices(files).map(tf.io.read_file)
    ds = ds.repeat().map(
        lambda data: tf.shape(ops.decode_image(data)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    ds = ds.batch(args.batch_size).prefetch(2)
    options = tf.data.Options()
    options.threading.private_threadpool_size = cores
    return iter(ds.with_options(options).as_numpy_iterator())


def train_batches(args, root: str, cores: int, **overrides):
    from crossformer_jax.data import pipeline as ip

    cfg = data_config(args, root, private_threadpool_size=cores, **overrides)
    return ip.create_train_iterator(cfg, local_batch_size=args.batch_size, seed=0)


def eval_batches(args, root: str, cores: int):
    import itertools

    from crossformer_jax.data import pipeline as ip

    cfg = data_config(args, root, private_threadpool_size=cores)

    def endless():
        while True:
            yield from ip.create_eval_iterator(cfg, local_batch_size=args.batch_size)

    return itertools.islice(endless(), None)


def device_ops_batches(args, **overrides):
    """Iterator that runs ``batch_ops.train_images`` on one uint8 batch with JAX on this
    process's cores, as the train step does on the accelerator."""
    import jax
    import numpy as np

    from crossformer_jax.augment import batch_ops

    cfg = data_config(args, '', **overrides)
    images = np.random.RandomState(0).randint(0, 256, (args.batch_size, 224, 224, 3), np.uint8)
    images = jax.device_put(images)
    step = jax.jit(lambda x, k: batch_ops.train_images(x, k, cfg))
    key = jax.random.key(0)
    jax.block_until_ready(step(images, key))
    while True:
        key = jax.random.fold_in(key, 1)
        yield jax.block_until_ready(step(images, key))


def folder_files(root: str, split: str) -> list[tuple[str, int]]:
    """(path, class index) of an image folder's split: the files the input pipeline reads."""
    from crossformer_jax.data import sources

    paths, labels, _ = sources.list_folder(root, split, None)
    return list(zip(paths, labels.tolist()))


def reference_batches(args, root: str, cores: int):
    """Endless batches of the original PyTorch loader, ``cores`` worker processes."""
    from benchmarks import reference_loader

    loader = reference_loader.reference_loader(
        folder_files(root, args.train_split), batch_size=args.batch_size, workers=cores
    )
    while True:
        yield from loader


def time_batches(iterator, count: int) -> tuple[float, float]:
    """Wall-clock and process CPU seconds for ``count`` batches after one untimed warm-up."""
    next(iterator)
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        next(iterator)
    return time.perf_counter() - start, time.process_time() - start_cpu


def main() -> None:
    args = parse_args()
    cores = pin(args.cores)
    root = args.data_dir
    if not (root or args.tfds):
        root = make_folder(args.make_dir, args.images)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(len(cores))
    tf.config.threading.set_inter_op_parallelism_threads(len(cores))
    n = len(cores)
    makers = {
        'decode': ('decode only', lambda: decode_only_batches(args, root, n)),
        'host': (
            '+ crop/flip (host part of the full recipe)',
            lambda: train_batches(args, root, n),
        ),
        'device_randaugment': (
            'device: + RandAugment (JAX, same cores)',
            lambda: device_ops_batches(args, random_erasing_prob=0.0),
        ),
        'device': (
            'device: + erasing (device part of the full recipe)',
            lambda: device_ops_batches(args),
        ),
        'reference': (
            f'original loader, full recipe ({n} worker processes)',
            lambda: reference_batches(args, root, n),
        ),
        'eval': ('eval (resize + centre crop)', lambda: eval_batches(args, root, n)),
    }
    if args.tfds and 'reference' in args.stages.split(','):
        raise SystemExit('the reference row reads image folders: give --data-dir or no data')
    stages = [s for s in args.stages.split(',') if s in makers]
    rates: dict[str, list[float]] = {s: [] for s in stages}
    cpu_rates: dict[str, list[float]] = {s: [] for s in stages}
    for r in range(args.rounds):
        order = stages if r % 2 == 0 else stages[::-1]
        for stage in order:
            iterator = makers[stage][1]()
            seconds, cpu_seconds = time_batches(iterator, args.batches)
            rates[stage].append(args.batches * args.batch_size / seconds)
            cpu_rates[stage].append(args.batches * args.batch_size / cpu_seconds)
            if hasattr(iterator, 'close'):
                iterator.close()
            del iterator
    source = f'tfds {args.tfds}' if args.tfds else root
    print(f'\n{source}; {n} core(s) {cores}; batch {args.batch_size}; ', end='')
    print(f'{args.rounds} rounds of {args.batches} batches\n')
    print('| stage | images/s (median) | range | images per CPU-second (median) |')
    print('|---|---:|---:|---:|')
    for stage in stages:
        values = rates[stage]
        # The loader's work happens in its worker processes, which this process's clock misses.
        per_cpu = '-' if stage == 'reference' else f'{statistics.median(cpu_rates[stage]):.0f}'
        print(
            f'| {makers[stage][0]} | {statistics.median(values):.0f} '
            f'| {min(values):.0f}-{max(values):.0f} | {per_cpu} |'
        )
    if 'host' in stages and 'reference' in stages:
        ratios = [a / b for a, b in zip(rates['host'], rates['reference'])]
        print(
            f'\nhost pipeline / original loader, per round: {statistics.median(ratios):.2f}x '
            f'[{min(ratios):.2f}-{max(ratios):.2f}]'
        )


if __name__ == '__main__':
    main()
