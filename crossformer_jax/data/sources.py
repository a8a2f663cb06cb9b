"""Data sources: which elements a process reads, in which order, and what a dataset holds.

``make_source(cfg, split, process_index, process_count)`` gives this process's share of a split
as a source with ``num_examples`` (this shard), ``max_shard_examples`` (the largest shard),
``total_examples``, ``load`` (``data`` -> encoded bytes), ``train_stream(seed, process_index,
start_epoch, start_position, cfg)`` (endless, with ``epoch`` and ``position``) and
``eval_stream(cfg)`` (one pass in file order). Their elements are ``{'data', 'label', 'id'}``
(``data``: an encoded image or its path; ``id``: the file path / TFDS ``file_name``); a source of
dense labels (``ADE20KSource``) gives ``label_data`` (a PNG path) instead of ``label``.
``get_dataset_info(cfg)``: number of classes and examples of the whole splits.

Datasets (``config.data.dataset``):

* ``'image_folder'``: ``DATA_DIR/<split>/<class>/<image>``; class ids = the sorted class folders
  of the training split.
* ``'ade20k'`` (ADEChallengeData2016)::

      DATA_DIR/images/<split>/<stem>.jpg
      DATA_DIR/annotations/<split>/<stem>.png     # one channel: 0 = other, 1..K = classes

* any other name: a TFDS dataset prepared in ``data_dir``, with 'image'/'label' features, as
  TFRecord (streamed, below) or ArrayRecord (random access: trained like an image folder, an
  epoch is a stateless permutation of the shard's record indices, and resuming skips record
  indices for free).

*Sharding.* Process ``i`` of ``n`` reads only its shard: for a folder the files
``i, i+n, i+2n, ...`` of the sorted file list; for TFDS the ``i``-th of
``tfds.even_splits(split, n)`` (example-exact ranges inside the record files).

*Order and resume.* A training stream is an endless sequence of epochs over the process's shard,
starting at ``start_position`` of ``start_epoch`` without reading anything before it:

* folders and TFDS ArrayRecord: epoch ``e`` is the permutation
  ``stateless_shuffle(range(n), (seed, process, e))`` of the shard's files or records; resuming
  skips indices, which costs nothing.
* TFDS TFRecord (no random access): per epoch the shard's file instructions are shuffled
  (stateless, per epoch) and cut into *groups* of consecutive files holding about
  ``shuffle_buffer`` records; each group is read whole, permuted with a stateless shuffle seeded
  by (epoch, group) and streamed. Records in TFDS-prepared files are already globally shuffled,
  so this gives a well mixed order. Resuming skips whole groups for free (their sizes are known
  from the metadata) and reads, but does not decode, the part of one group before the resume
  point. Memory: about three groups of encoded records (at 16384 ImageNet records, ~110 KB
  each: ~5 GB); lower ``shuffle_buffer`` on small hosts.

Per-example random draws come from ``element_key(shard_key(seed, process_index, domain), el)``,
a function of (seed, process, domain, epoch, position): an element looks the same however the
stream was reached.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import numpy as np
import tensorflow as tf

from crossformer_jax.data.config import ADE20K_DEFAULTS, data_field
from crossformer_jax.weights.pretrained import imagenet_label_names

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')
_INT64_MAX = np.iinfo(np.int64).max

# Domains folded into the seed so the streams of random numbers are unrelated.
PERMUTATION_DOMAIN = 0  # epoch order (folders, ArrayRecord) / file order (TFRecord)
AUGMENT_DOMAIN = 1  # classification crop and flip
GROUP_DOMAIN = 2  # record order inside a TFRecord group
SEGMENTATION_AUGMENT_DOMAIN = 3  # segmentation rescale, crop, flip, distortion


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    num_train_examples: int
    num_eval_examples: int
    class_names: tuple[str, ...] | None = None  # folder names / TFDS label names, by class id


# ----------------------------------------------------------------------------
# Paths, parallelism, random keys


def is_remote(path: str) -> bool:
    """gs://, s3://...: paths that only tf.io.gfile reads."""
    return '://' in path


def isdir(path: str) -> bool:
    """Whether path is a directory, local or remote."""
    return tf.io.gfile.isdir(path) if is_remote(path) else os.path.isdir(path)


def parallel_calls(cfg) -> int:
    """config.data.num_parallel_calls as tf.data takes it (<= 0: AUTOTUNE)."""
    n = int(data_field(cfg, 'num_parallel_calls'))
    return tf.data.AUTOTUNE if n <= 0 else n


def _capped(parallel: int, cycle_length: int) -> int:
    """tf.data wants num_parallel_calls <= cycle_length unless it is AUTOTUNE."""
    return parallel if parallel == tf.data.AUTOTUNE else min(parallel, cycle_length)


def shard_key(seed: int, process_index: int, domain: int) -> tf.Tensor:
    """Stateless key (2,) int64 of one stream of random numbers of one process."""
    key = tf.constant([seed, process_index], tf.int64)
    return tf.random.experimental.stateless_fold_in(key, domain)


def element_key(key: tf.Tensor, el) -> tf.Tensor:
    """Stateless key (2,) of a training element: key folded with its epoch and position."""
    return tf.random.experimental.stateless_fold_in(
        tf.random.experimental.stateless_fold_in(key, el['epoch']), el['position']
    )


def _shuffled_indices(
    n: int, seed: int, process_index: int, start_epoch: int, start_position: int
) -> tf.data.Dataset:
    """Endless {'index', 'epoch', 'position'} elements: each epoch a permutation of range(n) that
    depends only on (seed, process_index, epoch), starting at `start_position` of `start_epoch`."""
    perm_key = shard_key(seed, process_index, PERMUTATION_DOMAIN)

    def epoch(e):
        perm = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), seed=tf.random.experimental.stateless_fold_in(perm_key, e)
        )
        return tf.data.Dataset.from_tensor_slices(
            {'index': perm, 'epoch': tf.fill([n], e), 'position': tf.range(n, dtype=tf.int64)}
        )

    return tf.data.Dataset.range(start_epoch, _INT64_MAX).flat_map(epoch).skip(start_position)


# ----------------------------------------------------------------------------
# Image folders


@functools.lru_cache(maxsize=16)
def list_folder(
    root: str, split: str, class_names: tuple[str, ...] | None
) -> tuple[tuple[str, ...], np.ndarray, tuple[str, ...]]:
    """Sorted (paths, labels, class_names) of ``root/split/<class>/*``; ``class_names`` None:
    the class folders found."""
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
    root = data_field(cfg, 'data_dir')
    train_split = data_field(cfg, 'train_split')
    if tf.io.gfile.isdir(os.path.join(root, train_split)):
        return list_folder(root, train_split, None)[2]
    eval_split = data_field(cfg, 'eval_split')
    logger.warning(
        'No %s split in %s: class ids come from the %s split.', train_split, root, eval_split
    )
    return list_folder(root, eval_split, None)[2]


class FolderSource:
    """``root/<split>/<class>/<image>``; class ids = sorted train class folders."""

    def __init__(self, cfg, split: str, process_index: int, process_count: int):
        root = data_field(cfg, 'data_dir')
        paths, labels, _ = list_folder(root, split, _folder_classes(cfg))
        self._set_files(paths, labels, process_index, process_count)

    def _set_files(self, paths, labels, process_index: int, process_count: int) -> None:
        """This process's share of the sorted (paths, labels): files i, i+n, ..."""
        self.total_examples = len(paths)
        self.max_shard_examples = -(-len(paths) // process_count)
        self.paths = np.asarray(paths, dtype=object)[process_index::process_count]
        self.labels = np.asarray(labels)[process_index::process_count]
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


def _list_ade20k(root: str, split: str) -> tuple[list[str], list[str]]:
    """Sorted (image paths, annotation paths) of one split; every image needs its annotation."""
    image_dir = os.path.join(root, 'images', split)
    label_dir = os.path.join(root, 'annotations', split)
    for path in (image_dir, label_dir):
        if not tf.io.gfile.isdir(path):
            raise FileNotFoundError(f'segmentation split folder not found: {path}')
    labels = {
        os.path.splitext(n)[0]: n for n in tf.io.gfile.listdir(label_dir) if n.endswith('.png')
    }
    images, annotations, missing = [], [], []
    for name in sorted(tf.io.gfile.listdir(image_dir)):
        if name.startswith('.') or not name.lower().endswith(IMAGE_EXTENSIONS):
            continue
        stem = os.path.splitext(name)[0]
        if stem not in labels:
            missing.append(name)
            continue
        images.append(os.path.join(image_dir, name))
        annotations.append(os.path.join(label_dir, labels[stem]))
    if missing:
        raise ValueError(
            f'{len(missing)} image(s) of {image_dir} have no <stem>.png in {label_dir}, '
            f'e.g. {missing[0]}'
        )
    return images, annotations


class ADE20KSource(FolderSource):
    """Image + annotation pairs of DATA_DIR/{images,annotations}/<split>/; files i, i+n, ... of
    the sorted list on process i of n, the epoch order and resume of the image-folder source."""

    def __init__(self, cfg, split: str, process_index: int, process_count: int):
        images, annotations = _list_ade20k(data_field(cfg, 'data_dir'), split)
        self._set_files(images, np.asarray(annotations, dtype=object), process_index, process_count)

    def _elements(self, index: tf.Tensor, paths: tf.Tensor, labels: tf.Tensor):
        path = tf.gather(paths, index)
        return {'data': path, 'label_data': tf.gather(labels, index), 'id': path}


def _ade20k_info(cfg) -> DatasetInfo:
    """config.data.num_classes classes; examples counted in both splits (0 if absent)."""
    root = data_field(cfg, 'data_dir')

    def count(split):
        if not tf.io.gfile.isdir(os.path.join(root, 'images', split)):
            return 0
        return len(_list_ade20k(root, split)[0])

    return DatasetInfo(
        int(data_field(cfg, 'num_classes', ADE20K_DEFAULTS)),
        count(data_field(cfg, 'train_split', ADE20K_DEFAULTS)),
        count(data_field(cfg, 'eval_split')),
    )


# ----------------------------------------------------------------------------
# TFDS


class TfdsSource:
    """A TFDS dataset prepared in ``data_dir`` (TFRecord files), read by this process's file
    instructions; images stay encoded (decoded by the pipeline)."""

    def __init__(self, cfg, split: str, process_index: int, process_count: int):
        import tensorflow_datasets as tfds  # heavy: only for TFDS datasets

        self._tfds = tfds
        info = _tfds_builder(cfg).info
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
        buffer = int(data_field(cfg, 'shuffle_buffer'))
        per_file = max(1.0, float(np.mean(takes)))
        return int(min(len(takes), max(1, round(buffer / per_file))))

    def train_stream(
        self, seed: int, process_index: int, start_epoch: int, start_position: int, cfg
    ) -> tf.data.Dataset:
        m = len(self.instructions)
        files_per_group = self._group_plan(cfg)
        num_groups = -(-m // files_per_group)
        names, skips, takes = self._instruction_tensors()
        file_key = shard_key(seed, process_index, PERMUTATION_DOMAIN)
        group_key = shard_key(seed, process_index, GROUP_DOMAIN)
        parallel = parallel_calls(cfg)

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
            num_parallel_calls=_capped(parallel_calls(cfg), cycle),
            deterministic=True,
        )
        return ds.map(self._parse, num_parallel_calls=parallel_calls(cfg), deterministic=True)


class ArrayRecordSource(TfdsSource):
    """A TFDS dataset prepared as ArrayRecord: random access by record index, so training
    and resuming work as for an image folder (a stateless permutation of the shard per
    epoch; resuming skips indices). Records are read in chunks of ``READ_CHUNK`` through
    ``array_record``'s data source and parsed like TFRecord examples."""

    READ_CHUNK = 64

    def __init__(self, cfg, split: str, process_index: int, process_count: int):
        super().__init__(cfg, split, process_index, process_count)
        from array_record.python import array_record_data_source  # only for ArrayRecord

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

        ds = ds.batch(self.READ_CHUNK).map(read, num_parallel_calls=parallel_calls(cfg))
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
        return ds.map(self._parsed, num_parallel_calls=parallel_calls(cfg), deterministic=True)

    def eval_stream(self, cfg) -> tf.data.Dataset:
        ds = tf.data.Dataset.range(self.num_examples).map(lambda i: {'index': i})
        ds = self._with_records(ds, cfg)
        return ds.map(self._parsed, num_parallel_calls=parallel_calls(cfg), deterministic=True)


def _file_format(info) -> str:
    value = getattr(info, 'file_format', 'tfrecord')
    return str(getattr(value, 'value', value)).lower()


def _tfds_builder(cfg):
    import tensorflow_datasets as tfds  # heavy: only for TFDS datasets

    return tfds.builder(data_field(cfg, 'dataset'), data_dir=data_field(cfg, 'data_dir') or None)


# ----------------------------------------------------------------------------
# Entry points


def make_source(cfg, split: str, process_index: int, process_count: int):
    """This process's source of ``split`` (see the module doc)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f'bad process_index {process_index} for {process_count} processes')
    dataset = data_field(cfg, 'dataset')
    if dataset == 'image_folder':
        return FolderSource(cfg, split, process_index, process_count)
    if dataset == 'ade20k':
        return ADE20KSource(cfg, split, process_index, process_count)
    if _file_format(_tfds_builder(cfg).info) == 'array_record':
        return ArrayRecordSource(cfg, split, process_index, process_count)
    return TfdsSource(cfg, split, process_index, process_count)


def get_dataset_info(data_config) -> DatasetInfo:
    """Number of classes and examples (whole splits, all processes)."""
    cfg = data_config
    train_split = data_field(cfg, 'train_split')
    eval_split = data_field(cfg, 'eval_split')
    dataset = data_field(cfg, 'dataset')
    if dataset == 'image_folder':
        root = data_field(cfg, 'data_dir')
        classes = _folder_classes(cfg)

        def count(split):
            if not tf.io.gfile.isdir(os.path.join(root, split)):
                return 0
            return len(list_folder(root, split, classes)[0])

        return DatasetInfo(len(classes), count(train_split), count(eval_split), tuple(classes))
    if dataset == 'ade20k':
        return _ade20k_info(cfg)
    info = _tfds_builder(cfg).info

    def count(split):
        try:
            return int(info.splits[split].num_examples)
        except (KeyError, ValueError):
            return 0

    label = info.features['label']
    names = tuple(label.names) if label.names else None
    if dataset == 'imagenet2012':  # readable names in the WordNet-id order
        names = tuple(imagenet_label_names())
    return DatasetInfo(int(label.num_classes), count(train_split), count(eval_split), names)
