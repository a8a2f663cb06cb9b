"""tf.data input pipeline: ImageNet-2012 (TFDS) or an image folder.

Public API (used by the trainer)::

    info = get_dataset_info(config.data)
    train_it = create_train_iterator(config.data, local_batch_size=B, seed=0,
                                     start_step=step, process_index=i,
                                     process_count=n)
    eval_it = create_eval_iterator(config.data, local_batch_size=B,
                                   process_index=i, process_count=n)
    corrupt_image_count()

Both iterators take the task's per-example functions (see crossformer_jax.tasks):
``decode`` (encoded element -> decoded tensors, run under the corrupt-file guard) and
``preprocess`` (decoded element -> example); without them they make classification
examples. Classification batches are dicts of numpy arrays: ``image`` uint8
(B, S, S, 3), cropped, resized and flipped; ``label`` int32 (B,); eval batches also
carry ``mask`` bool (B,). RandAugment, normalisation and random erasing run on the
device, in the train step: ``batch_ops.train_images`` / ``batch_ops.eval_images`` (a
quarter of the bytes to transfer, and the per-pixel work where it is cheapest).
Resizing is PIL's (``preprocess_ops.resize``), as in the reference PyTorch pipeline.

Sources give elements ``{'data', 'label', 'id'}`` (``data``: an encoded image
or its path); a source of dense labels (``dataset='ade20k'``, see
crossformer_jax.segmentation_ops) gives ``label_data`` (a PNG path) instead of
``label``, decoded next to the image into a uint8 (H, W) ``label`` map.

Config fields read (``config.data``), with the defaults assumed when absent::

    dataset = 'imagenet2012'        # or 'image_folder'; any other name is read as
                                    # a TFDS dataset with 'image'/'label' features
    data_dir = ''                   # TFDS data_dir ('' = TFDS default) / folder root
    train_split = 'train'; eval_split = 'validation'
    image_size = 224
    eval_crop_fraction = 0.875      # short side -> floor(image_size / fraction)
    rrc_scale = (0.08, 1.0); rrc_ratio = (3/4, 4/3)
    hflip = True
    randaugment = 'rand-m9-mstd0.5-inc1'   # } read by batch_ops on the device: '' disables;
    randaugment_fill = None         # } fill colour of geometric RandAugment ops (None =
                                    # } round(255 * mean), like timm's train transform)
    random_erasing_prob = 0.25      # }
    mean = (0.485, 0.456, 0.406); std = (0.229, 0.224, 0.225)  # }
    shuffle_buffer = 16384          # TFDS only: records per shuffle group (below)
    num_parallel_calls = -1         # -1 = tf.data.AUTOTUNE
    prefetch = 2                    # batches prefetched by tf.data
    private_threadpool_size = 0     # >0: tf.data runs on its own pool of that many threads

Design
------
*TFDS file formats.* TFRecord (streamed, below) and ArrayRecord (random access:
trained like an image folder, an epoch is a stateless permutation of the shard's
record indices, and resuming skips indices for free).

*Sharding.* Process ``i`` of ``n`` reads only its shard: for an image folder the
files ``i, i+n, i+2n, ...`` of the sorted file list; for TFDS the ``i``-th of
``tfds.even_splits(split, n)`` (example-exact ranges inside the record files).

*Order and resume.* Training is an endless stream of epochs over the process's
shard; batch ``k`` holds stream elements ``[kB, (k+1)B)``. Every random choice
of an element's crop and flip comes from stateless RNG ops seeded by
``(seed, process_index, epoch, position in epoch)``, so an element looks the
same however the stream was reached (RandAugment and random erasing on the device
draw from the train step's key, a function of (seed, step)). ``start_step=k`` starts
at element ``kB`` without decoding anything before it:

* image folder: epoch ``e`` is the permutation
  ``stateless_shuffle(range(n), (seed, process, e))`` of the shard's files;
  resuming skips file indices, which costs nothing.
* TFDS ArrayRecord: the same, over record indices.
* TFDS TFRecord (no random access): per epoch the shard's file instructions are
  shuffled (stateless, per epoch) and cut into *groups* of consecutive files
  holding about ``shuffle_buffer`` records; each group is read whole, permuted
  with a stateless shuffle seeded by (epoch, group) and streamed. Records in
  TFDS-prepared files are already globally shuffled, so this gives a well mixed
  order. Resuming skips whole groups for free (their sizes are known from the
  metadata) and reads, but does not decode, the part of one group before the
  resume point. Memory: about three groups of encoded records (at 16384
  ImageNet records, ~110 KB each: ~5 GB); lower ``shuffle_buffer`` on small hosts.

*Decoding.* A training image is decoded whole and cropped to its random-resized-crop
window (``preprocess_ops.decode_random_crop``; decoding only the window of a JPEG
measured slower on ImageNet-sized photos).

*Corrupt images.* Decoding runs in a guarded sub-dataset
(``map(decode).ignore_errors()`` followed by a placeholder), so a file that
cannot be read or decoded (truncated JPEG, garbage bytes, empty file) never
stops the pipeline and never changes which elements land in which batch
(a read error of the storage system counts as an unreadable file too). In a
training batch each corrupt example's slot is filled with a copy of another
(valid) example of the same batch; in an evaluation batch the slot is masked
out (``mask`` False, zero image). Either way the file is skipped, counted and
named in a warning (once per file per iterator). Because the substitution is
local to the batch, the position -> example mapping and therefore exact resume
are unaffected, and the same files are skipped every time. Counts:
``corrupt_image_count()`` (all iterators of this process) and the iterator's
``corrupt_count`` / ``corrupt_files`` attributes.

*Evaluation.* One pass over the process's shard in file order, batched; the last
batch is zero-padded with ``mask`` False. Every process yields the same number
of batches, ``ceil(max shard size / B)`` (``len(iterator)``), padding with fully
masked batches where its shard is shorter, so multi-host evaluation steps stay
in lockstep.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import threading
from typing import Any

import numpy as np
import tensorflow as tf

from crossformer_jax import preprocess_ops as ops

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')
_INT64_MAX = np.iinfo(np.int64).max
# Domains folded into the seed so the streams of random numbers are unrelated.
_PERMUTATION_DOMAIN = 0
_AUGMENT_DOMAIN = 1
_GROUP_DOMAIN = 2


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    num_train_examples: int
    num_eval_examples: int
    class_names: tuple[str, ...] | None = None  # folder names / TFDS label names, by class id


# ----------------------------------------------------------------------------
# Config access


_MISSING = object()


def _get(cfg: Any, name: str, default: Any = _MISSING) -> Any:
    if isinstance(cfg, dict) or hasattr(cfg, 'get'):
        value = cfg.get(name, default)
    else:
        value = getattr(cfg, name, default)
    if value is _MISSING:
        raise KeyError(f'config.data.{name} is required')
    return value


def _parallel(cfg) -> int:
    n = int(_get(cfg, 'num_parallel_calls', -1))
    return tf.data.AUTOTUNE if n <= 0 else n


def _capped(parallel: int, cycle_length: int) -> int:
    """tf.data wants num_parallel_calls <= cycle_length unless it is AUTOTUNE."""
    return parallel if parallel == tf.data.AUTOTUNE else min(parallel, cycle_length)


def _eval_resize_size(cfg) -> int:
    size = int(_get(cfg, 'image_size', 224))
    fraction = float(_get(cfg, 'eval_crop_fraction', 0.875))
    return math.floor(size / fraction + 1e-6)


# ----------------------------------------------------------------------------
# Corrupt image accounting


_COUNT_LOCK = threading.Lock()
_CORRUPT_TOTAL = 0


def corrupt_image_count() -> int:
    """Number of corrupt images skipped so far by all iterators of this process."""
    return _CORRUPT_TOTAL


def reset_corrupt_image_count() -> None:
    global _CORRUPT_TOTAL
    with _COUNT_LOCK:
        _CORRUPT_TOTAL = 0


def _add_corrupt(n: int) -> int:
    global _CORRUPT_TOTAL
    with _COUNT_LOCK:
        _CORRUPT_TOTAL += n
        return _CORRUPT_TOTAL


# ----------------------------------------------------------------------------
# Sources


def _shard_key(seed: int, process_index: int, domain: int) -> tf.Tensor:
    key = tf.constant([seed, process_index], tf.int64)
    return tf.random.experimental.stateless_fold_in(key, domain)


def _shuffled_indices(
    n: int, seed: int, process_index: int, start_epoch: int, start_position: int
) -> tf.data.Dataset:
    """Endless {'index', 'epoch', 'position'} elements: each epoch a permutation of range(n) that
    depends only on (seed, process_index, epoch), starting at `start_position` of `start_epoch`."""
    perm_key = _shard_key(seed, process_index, _PERMUTATION_DOMAIN)

    def epoch(e):
        perm = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), seed=tf.random.experimental.stateless_fold_in(perm_key, e)
        )
        return tf.data.Dataset.from_tensor_slices(
            {'index': perm, 'epoch': tf.fill([n], e), 'position': tf.range(n, dtype=tf.int64)}
        )

    return tf.data.Dataset.range(start_epoch, _INT64_MAX).flat_map(epoch).skip(start_position)


@functools.lru_cache(maxsize=16)
def _list_folder(
    root: str, split: str, class_names: tuple[str, ...] | None
) -> tuple[tuple[str, ...], np.ndarray, tuple[str, ...]]:
    """Sorted (paths, labels, class_names) of ``root/split/<class>/*``."""
    split_dir = os.path.join(root, split)
    if not tf.io.gfile.isdir(split_dir):
        raise FileNotFoundError(f'image folder split not found: {split_dir}')
    found = sorted(
        d.rstrip('/')
        for d in tf.io.gfile.listdir(split_dir)
        if not d.startswith('.') and tf.io.gfile.isdir(os.path.join(split_dir, d))
    )
    if class_names is None:
        class_names = tuple(found)
    index = {c: i for i, c in enumerate(class_names)}
    unknown = [c for c in found if c not in index]
    if unknown:
        raise ValueError(f'{split_dir} has class folders not in the training split: {unknown[:5]}')
    paths, labels, skipped = [], [], 0
    for c in found:
        class_dir = os.path.join(split_dir, c)
        for name in sorted(tf.io.gfile.listdir(class_dir)):
            if name.startswith('.') or name.endswith('/'):
                continue
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                skipped += 1
                continue
            paths.append(os.path.join(class_dir, name))
            labels.append(index[c])
    if skipped:
        logger.info(
            '%s: ignored %d files without an image extension %s',
            split_dir,
            skipped,
            IMAGE_EXTENSIONS,
        )
    return tuple(paths), np.asarray(labels, np.int64), class_names


def _folder_classes(cfg) -> tuple[str, ...]:
    root = _get(cfg, 'data_dir')
    train_split = _get(cfg, 'train_split', 'train')
    if tf.io.gfile.isdir(os.path.join(root, train_split)):
        return _list_folder(root, train_split, None)[2]
    eval_split = _get(cfg, 'eval_split', 'validation')
    logger.warning(
        'No %s split in %s: class ids come from the %s split.', train_split, root, eval_split
    )
    return _list_folder(root, eval_split, None)[2]


class _FolderSource:
    """``root/<split>/<class>/<image>``; class ids = sorted train class folders."""

    def __init__(self, cfg, split: str, process_index: int, process_count: int):
        root = _get(cfg, 'data_dir')
        paths, labels, _ = _list_folder(root, split, _folder_classes(cfg))
        self.total_examples = len(paths)
        self.max_shard_examples = -(-len(paths) // process_count)
        self.paths = np.asarray(paths, dtype=object)[process_index::process_count]
        self.labels = labels[process_index::process_count]
        self.num_examples = len(self.paths)

    @staticmethod
    def load(data: tf.Tensor) -> tf.Tensor:
        return tf.io.read_file(data)

    def _elements(self, index: tf.Tensor, paths: tf.Tensor, labels: tf.Tensor):
        path = tf.gather(paths, index)
        return {'data': path, 'label': tf.gather(labels, index), 'id': path}

    def train_stream(
        self, seed: int, process_index: int, start_epoch: int, start_position: int, cfg
    ) -> tf.data.Dataset:
        paths = tf.constant(list(self.paths), tf.string)
        labels = tf.constant(self.labels)
        ds = _shuffled_indices(self.num_examples, seed, process_index, start_epoch, start_position)

        def lookup(el):
            out = self._elements(el['index'], paths, labels)
            out.update(epoch=el['epoch'], position=el['position'])
            return out

        return ds.map(lookup)

    def eval_stream(self, cfg) -> tf.data.Dataset:
        paths = tf.constant(list(self.paths), tf.string)
        labels = tf.constant(self.labels)
        ds = tf.data.Dataset.range(self.num_examples)
        return ds.map(lambda i: self._elements(i, paths, labels))


class _TfdsSource:
    """A TFDS dataset prepared in ``data_dir`` (TFRecord files), read by this
    process's file instructions; images stay encoded until ``_guarded``."""

    def __init__(self, cfg, split: str, process_index: int, process_count: int):
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

        self._tfds = tfds
        builder = _tfds_builder(_get(cfg, 'dataset'), _get(cfg, 'data_dir', '') or None)
        info = builder.info
        self.file_format = _file_format(info)
        if self.file_format not in ('tfrecord', 'array_record'):
            raise NotImplementedError(
                f'TFDS dataset {info.name} is prepared as {self.file_format}; only tfrecord and '
                'array_record are supported'
            )
        if process_count > 1:
            shards = tfds.even_splits(split, n=process_count)
            sizes = [info.splits[s].num_examples for s in shards]
            sub = info.splits[shards[process_index]]
        else:
            sub = info.splits[split]
            sizes = [sub.num_examples]
        self.total_examples = int(sum(sizes))
        self.max_shard_examples = int(max(sizes))
        self.num_examples = int(sub.num_examples)
        self.instructions = [fi for fi in sub.file_instructions if fi.take > 0]
        self.features = info.features
        self._has_file_name = 'file_name' in info.features

    @staticmethod
    def load(data: tf.Tensor) -> tf.Tensor:
        return data

    def _instruction_tensors(self):
        return (
            tf.constant([fi.filename for fi in self.instructions], tf.string),
            tf.constant([fi.skip for fi in self.instructions], tf.int64),
            tf.constant([fi.take for fi in self.instructions], tf.int64),
        )

    @staticmethod
    def _read(filename, skip, take):
        return tf.data.TFRecordDataset(filename, buffer_size=4 << 20).skip(skip).take(take)

    def _parse(self, serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        ex = self.features.deserialize_example(
            serialized, decoders={'image': self._tfds.decode.SkipDecoding()}
        )
        name = ex['file_name'] if self._has_file_name else tf.constant('')
        return {'data': ex['image'], 'label': tf.cast(ex['label'], tf.int64), 'id': name}

    def _group_plan(self, cfg) -> int:
        takes = [fi.take for fi in self.instructions]
        buffer = int(_get(cfg, 'shuffle_buffer', 16384))
        per_file = max(1.0, float(np.mean(takes)))
        return int(min(len(takes), max(1, round(buffer / per_file))))

    def train_stream(
        self, seed: int, process_index: int, start_epoch: int, start_position: int, cfg
    ) -> tf.data.Dataset:
        m = len(self.instructions)
        files_per_group = self._group_plan(cfg)
        num_groups = -(-m // files_per_group)
        names, skips, takes = self._instruction_tensors()
        file_key = _shard_key(seed, process_index, _PERMUTATION_DOMAIN)
        group_key = _shard_key(seed, process_index, _GROUP_DOMAIN)
        parallel = _parallel(cfg)

        def file_order(e):
            return tf.random.experimental.stateless_shuffle(
                tf.range(m, dtype=tf.int64),
                seed=tf.random.experimental.stateless_fold_in(file_key, e),
            )

        # Where the resume position falls: group g0 of epoch e0, offset inside it.
        order0 = file_order(tf.constant(start_epoch, tf.int64)).numpy()
        lengths0 = np.asarray([fi.take for fi in self.instructions])[order0]
        group_sizes = np.add.reduceat(lengths0, np.arange(0, m, files_per_group))
        group_starts = np.concatenate([[0], np.cumsum(group_sizes)])
        g0 = int(np.searchsorted(group_starts, start_position, side='right') - 1)
        offset = int(start_position - group_starts[g0])

        def load_group(e, g):
            order = file_order(e)
            lo = g * files_per_group
            idx = order[lo : lo + files_per_group]
            start = tf.reduce_sum(tf.gather(takes, order[:lo]))
            group_takes = tf.gather(takes, idx)
            total = tf.reduce_sum(group_takes)
            records = tf.data.Dataset.from_tensor_slices(
                (tf.gather(names, idx), tf.gather(skips, idx), group_takes)
            )
            records = records.interleave(
                self._read,
                cycle_length=files_per_group,
                block_length=1,
                num_parallel_calls=_capped(parallel, files_per_group),
                deterministic=True,
            )
            records = records.batch(total).get_single_element()
            perm = tf.random.experimental.stateless_shuffle(
                tf.range(total),
                seed=tf.random.experimental.stateless_fold_in(
                    tf.random.experimental.stateless_fold_in(group_key, e), g
                ),
            )
            return {
                'record': tf.gather(records, perm),
                'epoch': tf.fill([total], e),
                'position': start + tf.range(total),
            }

        groups = tf.data.Dataset.range(start_epoch, _INT64_MAX).flat_map(
            lambda e: tf.data.Dataset.range(num_groups).map(lambda g: (e, g))
        )
        groups = groups.skip(g0).map(load_group).prefetch(1)
        ds = groups.unbatch().skip(offset)

        def parse(el):
            out = self._parse(el['record'])
            out.update(epoch=el['epoch'], position=el['position'])
            return out

        return ds.map(parse, num_parallel_calls=parallel, deterministic=True)

    def eval_stream(self, cfg) -> tf.data.Dataset:
        names, skips, takes = self._instruction_tensors()
        ds = tf.data.Dataset.from_tensor_slices((names, skips, takes))
        cycle = max(1, min(16, len(self.instructions)))
        ds = ds.interleave(
            self._read,
            cycle_length=cycle,
            block_length=1,
            num_parallel_calls=_capped(_parallel(cfg), cycle),
            deterministic=True,
        )
        return ds.map(self._parse, num_parallel_calls=_parallel(cfg), deterministic=True)


class _ArrayRecordSource(_TfdsSource):
    """A TFDS dataset prepared as ArrayRecord: random access by record index, so training
    and resuming work as for an image folder (a stateless permutation of the shard per
    epoch; resuming skips indices). Records are read in chunks of ``_READ_CHUNK`` through
    ``array_record``'s data source and parsed like TFRecord examples."""

    _READ_CHUNK = 64

    def __init__(self, cfg, split: str, process_index: int, process_count: int):
        super().__init__(cfg, split, process_index, process_count)
        from array_record.python import array_record_data_source

        self._records = array_record_data_source.ArrayRecordDataSource(self.instructions)
        if len(self._records) != self.num_examples:
            raise ValueError(
                f'array_record files hold {len(self._records)} records for this shard, the '
                f'TFDS metadata says {self.num_examples}'
            )

    def _read_chunk(self, indices: np.ndarray) -> np.ndarray:
        return np.asarray(self._records.__getitems__(indices.tolist()), dtype=object)

    def _with_records(self, ds: tf.data.Dataset, cfg) -> tf.data.Dataset:
        """Adds 'record' (the serialized example at 'index') to each element, reading in chunks."""

        def read(el):
            records = tf.numpy_function(self._read_chunk, [el['index']], tf.string, stateful=False)
            records.set_shape(el['index'].shape)
            return dict(el, record=records)

        ds = ds.batch(self._READ_CHUNK).map(read, num_parallel_calls=_parallel(cfg))
        return ds.unbatch()

    def _parsed(self, el):
        out = self._parse(el['record'])
        out.update({k: v for k, v in el.items() if k in ('epoch', 'position')})
        return out

    def train_stream(
        self, seed: int, process_index: int, start_epoch: int, start_position: int, cfg
    ) -> tf.data.Dataset:
        ds = _shuffled_indices(self.num_examples, seed, process_index, start_epoch, start_position)
        ds = self._with_records(ds, cfg)
        return ds.map(self._parsed, num_parallel_calls=_parallel(cfg), deterministic=True)

    def eval_stream(self, cfg) -> tf.data.Dataset:
        ds = tf.data.Dataset.range(self.num_examples).map(lambda i: {'index': i})
        ds = self._with_records(ds, cfg)
        return ds.map(self._parsed, num_parallel_calls=_parallel(cfg), deterministic=True)


def _file_format(info) -> str:
    value = getattr(info, 'file_format', 'tfrecord')
    return str(getattr(value, 'value', value)).lower()


def _tfds_builder(name: str, data_dir: str | None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    return tfds.builder(name, data_dir=data_dir)


def _make_source(cfg, split, process_index, process_count):
    if not 0 <= process_index < process_count:
        raise ValueError(f'bad process_index {process_index} for {process_count} processes')
    if _get(cfg, 'dataset') == 'image_folder':
        return _FolderSource(cfg, split, process_index, process_count)
    if _get(cfg, 'dataset') == 'ade20k':
        from crossformer_jax.segmentation_ops import ADE20KSource

        return ADE20KSource(cfg, split, process_index, process_count)
    info = _tfds_builder(_get(cfg, 'dataset'), _get(cfg, 'data_dir', '') or None).info
    if _file_format(info) == 'array_record':
        return _ArrayRecordSource(cfg, split, process_index, process_count)
    return _TfdsSource(cfg, split, process_index, process_count)


def get_dataset_info(data_config) -> DatasetInfo:
    """Number of classes and examples (whole splits, all processes)."""
    cfg = data_config
    train_split = _get(cfg, 'train_split', 'train')
    eval_split = _get(cfg, 'eval_split', 'validation')
    if _get(cfg, 'dataset') == 'image_folder':
        root = _get(cfg, 'data_dir')
        classes = _folder_classes(cfg)

        def count(split):
            if not tf.io.gfile.isdir(os.path.join(root, split)):
                return 0
            return len(_list_folder(root, split, classes)[0])

        return DatasetInfo(len(classes), count(train_split), count(eval_split), tuple(classes))
    if _get(cfg, 'dataset') == 'ade20k':
        from crossformer_jax.segmentation_ops import ade20k_info

        return ade20k_info(cfg)
    info = _tfds_builder(_get(cfg, 'dataset'), _get(cfg, 'data_dir', '') or None).info

    def count(split):
        try:
            return int(info.splits[split].num_examples)
        except (KeyError, ValueError):
            return 0

    label = info.features['label']
    names = tuple(label.names) if label.names else None
    if _get(cfg, 'dataset') == 'imagenet2012':  # readable names in the WordNet-id order
        from crossformer_jax.pretrained import imagenet_label_names

        names = tuple(imagenet_label_names())
    return DatasetInfo(int(label.num_classes), count(train_split), count(eval_split), names)


# ----------------------------------------------------------------------------
# Decoding and preprocessing


def decode_whole(load_fn):
    """Element -> {'image': uint8 (H, W, 3)} (+ 'label': uint8 (H, W) for dense labels)."""

    def fn(el):
        out = {'image': ops.decode_image(load_fn(el['data']))}
        if 'label_data' in el:
            label = tf.io.decode_png(load_fn(el['label_data']), channels=1)[..., 0]
            tf.debugging.assert_equal(
                tf.shape(label), tf.shape(out['image'])[:2], 'label and image sizes differ'
            )
            out['label'] = label
        return out

    return fn


def _guarded(decode_fn):
    """Element -> one element with 'image' (uint8), 'valid' and its metadata; never raises.

    ``decode_fn(el)`` -> dict of decoded tensors (reading and decoding, the only steps that
    can fail) runs in a one-element dataset with ``ignore_errors``; if it fails the
    placeholder that follows (1x1 black image, ``valid`` False) is taken.
    """

    encoded = ('data', 'label_data')

    def fn(el):
        meta = {k: v for k, v in el.items() if k not in encoded}

        def decode(e):
            return dict(meta, **decode_fn(e), valid=tf.constant(True))

        good = tf.data.Dataset.from_tensors(el).map(decode).ignore_errors()
        bad = dict(meta, image=tf.zeros([1, 1, 3], tf.uint8), valid=tf.constant(False))
        if 'label_data' in el:
            bad['label'] = tf.zeros([1, 1], tf.uint8)
        return good.concatenate(tf.data.Dataset.from_tensors(bad)).take(1)

    return fn


def _augment_seeds(key: tf.Tensor, el) -> list[tf.Tensor]:
    """(crop, flip) seeds of a stream element: f(seed, process, epoch, position)."""
    s = tf.random.experimental.stateless_fold_in(
        tf.random.experimental.stateless_fold_in(key, el['epoch']), el['position']
    )
    return tf.unstack(tf.random.experimental.stateless_split(s, 2))


def _train_decode(cfg, load_fn, *, seed: int, process_index: int):
    """Element -> {'image': uint8 pixels of its random resized crop window (before resizing)}.

    Classification's training decode (the only step of it that can fail on a corrupt file)."""
    scale = tuple(_get(cfg, 'rrc_scale', (0.08, 1.0)))
    ratio = tuple(_get(cfg, 'rrc_ratio', (3 / 4, 4 / 3)))
    key = _shard_key(seed, process_index, _AUGMENT_DOMAIN)

    def fn(el):
        s_crop, _ = _augment_seeds(key, el)
        return {
            'image': ops.decode_random_crop(load_fn(el['data']), s_crop, scale=scale, ratio=ratio)
        }

    return fn


def _train_preprocess(cfg, seed: int, process_index: int):
    """Cropped window -> uint8 (S, S, 3): resize, flip. RandAugment, normalisation and
    random erasing follow on the device (``batch_ops.train_images``)."""
    size = int(_get(cfg, 'image_size', 224))
    hflip = bool(_get(cfg, 'hflip', True))
    key = _shard_key(seed, process_index, _AUGMENT_DOMAIN)

    def fn(el):
        _, s_flip = _augment_seeds(key, el)
        image = ops.resize(el['image'], [size, size], method='bicubic')
        if hflip:
            image = ops.random_flip_left_right(image, s_flip)
        return {
            'image': image,
            'label': tf.cast(el['label'], tf.int32),
            'valid': el['valid'],
            'id': el['id'],
        }

    return fn


def _eval_preprocess(cfg):
    """Decoded image -> uint8 (S, S, 3); normalisation follows on the device."""
    size = int(_get(cfg, 'image_size', 224))
    short = _eval_resize_size(cfg)
    if short < size:
        raise ValueError(f'eval_crop_fraction must be <= 1 (resize to {short} < crop {size})')

    def fn(el):
        image = ops.resize_short_side(el['image'], short)
        image = ops.center_crop(image, size)
        return {
            'image': image,
            'label': tf.cast(el['label'], tf.int32),
            'valid': el['valid'],
            'id': el['id'],
        }

    return fn


def _options(cfg) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.threading.max_intra_op_parallelism = 1
    threads = int(_get(cfg, 'private_threadpool_size', 0))
    if threads > 0:
        options.threading.private_threadpool_size = threads
    return options


# ----------------------------------------------------------------------------
# Iterators


class _BaseIterator:
    """Wraps a tf.data iterator; handles corrupt examples and counts them."""

    def __init__(self, ds: tf.data.Dataset, return_ids: bool):
        self._it = ds.as_numpy_iterator()
        self._return_ids = return_ids
        self.corrupt_count = 0
        self.corrupt_files: set[str] = set()

    def __iter__(self):
        return self

    def _record_corrupt(self, ids) -> None:
        total = _add_corrupt(len(ids))
        self.corrupt_count += len(ids)
        for raw in ids:
            name = raw.decode('utf-8', 'replace') if isinstance(raw, bytes) else str(raw)
            if name not in self.corrupt_files:
                self.corrupt_files.add(name)
                logger.warning(
                    'Skipping corrupt or unreadable image %r (%d skipped so far in this process).',
                    name,
                    total,
                )


class TrainIterator(_BaseIterator):
    """Endless iterator of training batches ``{'image', 'label'}`` (numpy)."""

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        valid, ids = batch['valid'], batch['id']
        image, label = batch['image'], batch['label']
        if not valid.all():
            bad = np.flatnonzero(~valid)
            good = np.flatnonzero(valid)
            self._record_corrupt(ids[bad])
            if good.size:
                src = good[np.arange(bad.size) % good.size]
                image, label, ids = np.array(image), np.array(label), np.array(ids)
                image[bad], label[bad], ids[bad] = image[src], label[src], ids[src]
            else:
                logger.error(
                    'Every image of a training batch was corrupt; the batch holds placeholders.'
                )
        out = {'image': image, 'label': label}
        if self._return_ids:
            out['id'] = ids
        return out


class EvalIterator(_BaseIterator):
    """One pass of eval batches ``{'image', 'label', 'mask'}``; ``len()`` batches."""

    def __init__(self, ds, return_ids, batch_size, num_batches, image_size):
        super().__init__(ds, return_ids)
        self._batch_size = batch_size
        self._num_batches = num_batches
        self._image_size = image_size
        self._emitted = 0
        self._exhausted = False

    def __len__(self) -> int:
        return self._num_batches

    def _empty(self) -> dict[str, np.ndarray]:
        b, s = self._batch_size, self._image_size
        return {
            'image': np.zeros((b, s, s, 3), np.uint8),
            'label': np.zeros((b,), np.int32),
            'mask': np.zeros((b,), bool),
            'id': np.full((b,), b'', dtype=object),
        }

    def __next__(self) -> dict[str, np.ndarray]:
        if self._emitted >= self._num_batches:
            raise StopIteration
        out = self._empty()
        if not self._exhausted:
            try:
                batch = next(self._it)
            except StopIteration:
                self._exhausted = True
                batch = None
            if batch is not None:
                n, valid = len(batch['label']), batch['valid']
                out['image'][:n] = batch['image']
                out['image'][:n][~valid] = 0
                out['label'][:n] = batch['label']
                out['mask'][:n] = valid
                out['id'][:n] = batch['id']
                if not valid.all():
                    self._record_corrupt(batch['id'][~valid])
        self._emitted += 1
        if not self._return_ids:
            del out['id']
        return out


def create_train_iterator(
    data_config,
    *,
    local_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    return_ids: bool = False,
    decode=None,
    preprocess=None,
) -> TrainIterator:
    """Endless training batches for this process, starting at batch ``start_step``.

    ``create_train_iterator(..., start_step=k)`` yields exactly the batches a
    fresh iterator yields from its k-th on (same images, same augmentation).
    With ``return_ids`` batches also carry ``id`` (file path / TFDS file_name).
    ``decode``: ``load_fn -> (element -> decoded dict)``, and ``preprocess``: decoded
    element -> example, the task's functions (default: classification training).
    """
    cfg = data_config
    split = _get(cfg, 'train_split', 'train')
    source = _make_source(cfg, split, process_index, process_count)
    if source.num_examples == 0:
        raise ValueError(f'no training examples for process {process_index}')
    start_element = int(start_step) * int(local_batch_size)
    start_epoch, start_position = divmod(start_element, source.num_examples)
    parallel = _parallel(cfg)
    ds = source.train_stream(int(seed), process_index, start_epoch, start_position, cfg)
    if decode is None:
        decode = functools.partial(_train_decode, cfg, seed=int(seed), process_index=process_index)
    if preprocess is None:
        preprocess = _train_preprocess(cfg, int(seed), process_index)
    ds = ds.interleave(
        _guarded(decode(source.load)), num_parallel_calls=parallel, deterministic=True
    )
    ds = ds.map(
        preprocess,
        num_parallel_calls=parallel,
        deterministic=True,
    )
    ds = ds.batch(local_batch_size, drop_remainder=True)
    ds = ds.prefetch(int(_get(cfg, 'prefetch', 2)))
    return TrainIterator(ds.with_options(_options(cfg)), return_ids)


def create_eval_iterator(
    data_config,
    *,
    local_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    return_ids: bool = False,
    preprocess=None,
) -> EvalIterator:
    """One pass over this process's shard of the eval split (see module doc).

    ``preprocess``: the task's function (default: classification eval
    preprocessing); its examples must have one shape (fixed-size batches).
    """
    cfg = data_config
    split = _get(cfg, 'eval_split', 'validation')
    source = _make_source(cfg, split, process_index, process_count)
    parallel = _parallel(cfg)
    ds = source.eval_stream(cfg)
    ds = ds.interleave(
        _guarded(decode_whole(source.load)),
        num_parallel_calls=parallel,
        deterministic=True,
    )
    if preprocess is None:
        preprocess = _eval_preprocess(cfg)
    ds = ds.map(preprocess, num_parallel_calls=parallel, deterministic=True)
    ds = ds.batch(local_batch_size, drop_remainder=False)
    ds = ds.prefetch(int(_get(cfg, 'prefetch', 2)))
    num_batches = -(-source.max_shard_examples // local_batch_size)
    return EvalIterator(
        ds.with_options(_options(cfg)),
        return_ids,
        local_batch_size,
        num_batches,
        int(_get(cfg, 'image_size', 224)),
    )
