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
``decode`` (encoded element -> decoded tensors; its failures mark corrupt files) and
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

*Corrupt images.* Every stream element is numbered before decoding
(``numbered_examples``); an element whose reading or decoding fails (truncated JPEG,
garbage bytes, empty file, a read error of the storage system) is dropped by
``ignore_errors`` right after the decode, which costs nothing per element, so it
never stops the pipeline. The iterators regroup the examples by number, so a drop
never changes which elements land in which batch: in a training batch each missing
example's slot is filled with a copy of another (valid) example of the same batch;
in an evaluation batch the slot is masked out (``mask`` False, zero image). Either
way the file is counted and named in a warning (once per file per iterator; the
name is read back from the stream, which only happens for a missing number).
Because the substitution is local to the batch, the position -> example mapping and
therefore exact resume are unaffected, and the same files are skipped every time.
Counts: ``corrupt_image_count()`` (all iterators of this process) and the
iterator's ``corrupt_count`` / ``corrupt_files`` attributes.

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
    process's file instructions; images stay encoded until ``numbered_examples``."""

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


def numbered_examples(
    stream: tf.data.Dataset,
    decode_fn,
    preprocess,
    parallel: int,
    epoch_size: int | None = None,
    start: int = 0,
) -> tf.data.Dataset:
    """Stream elements -> ``preprocess`` examples with ``seq``, the element's number in the
    stream; elements whose ``decode_fn`` fails are left out.

    ``decode_fn(el)`` -> dict of decoded tensors: reading and decoding, the only steps that
    can fail on a corrupt file. The failures are dropped by ``ignore_errors`` right after it
    (at no cost per element), so the gaps in ``seq`` are the corrupt files; the iterators
    fill or mask those slots. An error in ``preprocess`` is raised.

    Without ``epoch_size`` (a finite evaluation stream) ``seq`` counts from 0. With it (the
    endless training stream; its first element is number ``start``) ``seq = epoch *
    epoch_size + position``, and after each epoch's last element comes a marker with
    ``seq = -1`` (a black 1x1 image through ``preprocess``): an epoch in which nothing
    decodes is then seen (``_NumberedBatches`` raises) instead of waited for forever.
    """
    encoded = ('data', 'label_data')
    placeholder = None  # the decoded tensors of an epoch marker
    if epoch_size is None:
        ds = stream.enumerate().map(lambda seq, el: dict(el, seq=seq))
    else:
        outputs = tf.function(decode_fn).get_concrete_function(stream.element_spec)
        placeholder = tf.nest.map_structure(
            lambda t: tf.zeros([d or 1 for d in t.shape.as_list()], t.dtype),
            outputs.structured_outputs,
        )
        marker = tf.nest.map_structure(lambda t: tf.zeros(t.shape, t.dtype), stream.element_spec)
        markers = tf.data.Dataset.from_tensors(dict(marker, seq=tf.constant(-1, tf.int64)))
        ds = tf.data.Dataset.choose_from_datasets(
            [
                stream.map(lambda el: dict(el, seq=el['epoch'] * epoch_size + el['position'])),
                markers.repeat(),
            ],
            _epoch_choices(start, epoch_size),
        )

    def decode(el):
        if placeholder is None:
            decoded = decode_fn(el)
        else:
            decoded = tf.cond(el['seq'] < 0, lambda: placeholder, lambda: decode_fn(el))
        return dict({k: v for k, v in el.items() if k not in encoded}, **decoded)

    ds = ds.map(decode, num_parallel_calls=parallel, deterministic=True).ignore_errors()
    return ds.map(
        lambda el: dict(preprocess(el), seq=el['seq']),
        num_parallel_calls=parallel,
        deterministic=True,
    )


def _epoch_choices(start: int, epoch_size: int) -> tf.data.Dataset:
    """0 for each stream element, 1 for the epoch marker after each epoch's last one."""
    element = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64))
    marker = tf.data.Dataset.from_tensors(tf.constant(1, tf.int64))
    rest = tf.data.Dataset.range(_INT64_MAX).flat_map(
        lambda _: element.repeat(epoch_size).concatenate(marker)
    )
    return element.repeat(epoch_size - start % epoch_size).concatenate(marker).concatenate(rest)


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
    """Wraps a tf.data iterator of numbered examples (``numbered_examples``, batched or not);
    counts and names the corrupt files, the numbers missing from it.

    ``ids_at(seqs)`` -> the ids (file paths / TFDS file names) of stream elements ``seqs``
    (sorted): called only for missing numbers, it reads the stream again up to them.
    """

    def __init__(self, ds: tf.data.Dataset, return_ids: bool, ids_at):
        self._it = ds.as_numpy_iterator()
        self._return_ids = return_ids
        self._ids_at = ids_at
        self.corrupt_count = 0
        self.corrupt_files: set[str] = set()

    def __iter__(self):
        return self

    def _record_corrupt(self, seqs: np.ndarray) -> list:
        """Counts and names (once per file) the missing elements ``seqs``; returns their ids."""
        ids = self._ids_at(seqs)
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
        return ids


def _stream_ids(stream_at):
    """``ids_at`` for ``_BaseIterator``: ``stream_at(seq)`` is the stream from element seq on."""

    def ids_at(seqs: np.ndarray) -> list:
        if len(seqs) == 0:
            return []
        first = int(seqs[0])
        offsets = {int(q) - first for q in seqs}
        ids = []
        for k, el in enumerate(stream_at(first).take(int(seqs[-1]) - first + 1)):
            if k in offsets:
                ids.append(el['id'].numpy())
        return ids

    return ids_at


class _NumberedBatches:
    """Batches of numbered examples regrouped by number: ``take(stop)`` returns every example
    numbered below ``stop`` not taken yet (a dict of arrays in number order, None if none)."""

    def __init__(self, it):
        self._it = it
        self._pending: dict[str, np.ndarray] | None = None
        self.exhausted = False
        self._markers = 0  # epoch markers (seq -1, training only) seen
        self._examples_since_marker = 0

    def _fetch(self) -> dict[str, np.ndarray]:
        """The next batch without its epoch markers (may be empty); raises if a whole epoch
        passed without one example."""
        batch = next(self._it)
        seq = batch['seq']
        markers = np.flatnonzero(seq < 0)
        if markers.size == 0:
            self._examples_since_marker += len(seq)
            return batch
        previous = -1
        for m in markers:
            self._examples_since_marker += m - previous - 1
            if self._markers and not self._examples_since_marker:
                raise RuntimeError(
                    'not one training image of a whole epoch could be read and decoded: every '
                    'file of the split is corrupt or unreadable (check data_dir and the files)'
                )
            self._markers += 1
            self._examples_since_marker = 0
            previous = m
        self._examples_since_marker += len(seq) - previous - 1
        keep = seq >= 0
        return {k: v[keep] for k, v in batch.items()}

    def take(self, stop: int) -> dict[str, np.ndarray] | None:
        pieces = [] if self._pending is None else [self._pending]
        self._pending = None
        # The examples below `stop` are all here once one numbered stop - 1 or more has come.
        while not self.exhausted and (not pieces or pieces[-1]['seq'][-1] < stop - 1):
            try:
                batch = self._fetch()
            except StopIteration:
                self.exhausted = True
            else:
                if len(batch['seq']):
                    pieces.append(batch)
        if not pieces:
            return None
        if len(pieces) == 1:
            batch = pieces[0]
        else:
            batch = {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
        n = int(np.searchsorted(batch['seq'], stop))
        if n < len(batch['seq']):
            self._pending = {k: v[n:] for k, v in batch.items()}
        if n == 0:
            return None
        return batch if n == len(batch['seq']) else {k: v[:n] for k, v in batch.items()}


class TrainIterator(_BaseIterator):
    """Endless iterator of training batches ``{'image', 'label'}`` (numpy); batch ``k`` holds
    stream elements ``[kB, (k+1)B)`` (numbered from ``start``), a corrupt one's slot filled
    with a copy of another example of the batch."""

    def __init__(self, ds, return_ids, ids_at, batch_size: int, start: int):
        super().__init__(ds, return_ids, ids_at)
        self._batches = _NumberedBatches(self._it)
        self._batch_size = batch_size
        self._next = start
        self._element_spec = ds.element_spec

    def __next__(self) -> dict[str, np.ndarray]:
        start, b = self._next, self._batch_size
        self._next += b
        got = self._batches.take(start + b)
        n = 0 if got is None else len(got['seq'])
        if n < b:
            got = self._fill(got, start)
        return {k: v for k, v in got.items() if k != 'seq' and (k != 'id' or self._return_ids)}

    def _fill(self, got, start: int) -> dict[str, np.ndarray]:
        """The full batch from the examples that decoded (``got``, may be None)."""
        b = self._batch_size
        slots = np.zeros(0, np.int64) if got is None else got['seq'] - start
        missing = np.setdiff1d(np.arange(b), slots)
        ids = self._record_corrupt(missing + start)
        if got is None:
            logger.error('Every image of a training batch was corrupt; the batch holds zeros.')
            shapes = {k: spec.shape[1:] for k, spec in self._element_spec.items() if k != 'id'}
            unknown = [k for k, shape in shapes.items() if not shape.is_fully_defined()]
            if unknown:
                raise RuntimeError(
                    'every image of a training batch was corrupt, and the examples have no '
                    f'fixed shape to fill it with (fields {unknown})'
                )
            out = {
                k: np.zeros([b, *shape], self._element_spec[k].dtype.as_numpy_dtype)
                for k, shape in shapes.items()
            }
            out['id'] = np.asarray(ids, dtype=object)
            return out
        source = np.arange(len(missing)) % len(slots)
        out = {}
        for k, v in got.items():
            full = np.empty((b, *v.shape[1:]), v.dtype)
            full[slots] = v
            full[missing] = v[source]
            out[k] = full
        return out


class EvalIterator(_BaseIterator):
    """One pass of eval batches ``{'image', 'label', 'mask'}``; ``len()`` batches. Slot ``j``
    of batch ``k`` is element ``kB + j`` of the shard; corrupt and padding slots are masked."""

    def __init__(self, ds, return_ids, ids_at, batch_size, num_batches, image_size, num_examples):
        super().__init__(ds, return_ids, ids_at)
        self._batches = _NumberedBatches(self._it)
        self._batch_size = batch_size
        self._num_batches = num_batches
        self._image_size = image_size
        self._num_examples = num_examples
        self._emitted = 0

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
        b = self._batch_size
        start = self._emitted * b
        self._emitted += 1
        out = self._empty()
        got = self._batches.take(start + b)
        slots = np.zeros(0, np.int64) if got is None else got['seq'] - start
        if got is not None:
            out['image'][slots] = got['image']
            out['label'][slots] = got['label']
            out['mask'][slots] = True
            out['id'][slots] = got['id']
        expected = np.arange(min(b, max(self._num_examples - start, 0)))
        missing = np.setdiff1d(expected, slots)
        if missing.size:
            out['id'][missing] = self._record_corrupt(missing + start)
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
    ds = numbered_examples(
        ds, decode(source.load), preprocess, parallel, source.num_examples, start_element
    )
    ds = ds.batch(local_batch_size, drop_remainder=True)
    ds = ds.prefetch(int(_get(cfg, 'prefetch', 2)))
    n = source.num_examples
    ids_at = _stream_ids(
        lambda seq: source.train_stream(int(seed), process_index, *divmod(seq, n), cfg)
    )
    return TrainIterator(
        ds.with_options(_options(cfg)), return_ids, ids_at, local_batch_size, start_element
    )


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
    if preprocess is None:
        preprocess = _eval_preprocess(cfg)
    ds = numbered_examples(source.eval_stream(cfg), decode_whole(source.load), preprocess, parallel)
    ds = ds.batch(local_batch_size, drop_remainder=False)
    ds = ds.prefetch(int(_get(cfg, 'prefetch', 2)))
    num_batches = -(-source.max_shard_examples // local_batch_size)
    return EvalIterator(
        ds.with_options(_options(cfg)),
        return_ids,
        _stream_ids(lambda seq: source.eval_stream(cfg).skip(seq)),
        local_batch_size,
        num_batches,
        int(_get(cfg, 'image_size', 224)),
        source.num_examples,
    )
