"""tf.data input pipeline: numbered examples of a source, batched into training and evaluation
iterators that survive corrupt files and resume exactly.

Public API (used by the trainer)::

    info = sources.get_dataset_info(config.data)
    train_it = create_train_iterator(config.data, local_batch_size=B, seed=0,
                                     start_step=step, process_index=i,
                                     process_count=n)
    eval_it = create_eval_iterator(config.data, local_batch_size=B,
                                   process_index=i, process_count=n)
    corrupt_image_count()

Both iterators take the task's per-example functions (see crossformer_jax.tasks):
``decode`` (encoded element -> decoded tensors; its failures mark corrupt files) and
``preprocess`` (decoded element -> example); without them they make classification
examples (crossformer_jax.data.classification). Classification batches are dicts of numpy
arrays: ``image`` uint8 (B, S, S, 3), ``label`` int32 (B,); eval batches also carry ``mask``
bool (B,). ``create_eval_examples`` gives evaluation examples one at a time (examples of
different shapes, e.g. whole images for segmentation).

The elements come from crossformer_jax.data.sources (sharding, epoch order, TFDS formats); the
``config.data`` fields read and their defaults are ``DATA_DEFAULTS`` of
crossformer_jax.data.config.

Design
------
*Order and resume.* Training is an endless stream of epochs over the process's shard; batch
``k`` holds stream elements ``[kB, (k+1)B)``. Every random choice of an element's preprocessing
comes from stateless RNG ops seeded by ``(seed, process_index, epoch, position in epoch)``, so
an element looks the same however the stream was reached. ``start_step=k`` starts at element
``kB`` without decoding anything before it (how each source skips: see sources).

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

import functools
import logging
import threading

import numpy as np
import tensorflow as tf

from crossformer_jax.data import classification
from crossformer_jax.data import preprocess_ops as ops
from crossformer_jax.data.config import data_field
from crossformer_jax.data.sources import make_source, parallel_calls

logger = logging.getLogger(__name__)


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


def add_corrupt_images(n: int) -> int:
    """Adds n skipped images to the process total (every loader counts here); returns it."""
    global _CORRUPT_TOTAL
    with _COUNT_LOCK:
        _CORRUPT_TOTAL += n
        return _CORRUPT_TOTAL


# ----------------------------------------------------------------------------
# Numbered examples


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
    decodes is then seen (``NumberedBatches`` raises) instead of waited for forever.
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
    rest = element.repeat(epoch_size).concatenate(marker).repeat()
    return element.repeat(epoch_size - start % epoch_size).concatenate(marker).concatenate(rest)


def _options(cfg) -> tf.data.Options:
    """Deterministic order; config.data.private_threadpool_size > 0: a private thread pool."""
    options = tf.data.Options()
    options.deterministic = True
    options.threading.max_intra_op_parallelism = 1
    threads = int(data_field(cfg, 'private_threadpool_size'))
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
        total = add_corrupt_images(len(ids))
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


class NumberedBatches:
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
        self._batches = NumberedBatches(self._it)
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
        self._batches = NumberedBatches(self._it)
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
    split = data_field(cfg, 'train_split')
    source = make_source(cfg, split, process_index, process_count)
    if source.num_examples == 0:
        raise ValueError(f'no training examples for process {process_index}')
    start_element = int(start_step) * int(local_batch_size)
    start_epoch, start_position = divmod(start_element, source.num_examples)
    parallel = parallel_calls(cfg)
    ds = source.train_stream(int(seed), process_index, start_epoch, start_position, cfg)
    if decode is None:
        decode = functools.partial(
            classification.train_decode, cfg, seed=int(seed), process_index=process_index
        )
    if preprocess is None:
        preprocess = classification.train_preprocess(cfg, int(seed), process_index)
    ds = numbered_examples(
        ds, decode(source.load), preprocess, parallel, source.num_examples, start_element
    )
    ds = ds.batch(local_batch_size, drop_remainder=True)
    ds = ds.prefetch(int(data_field(cfg, 'prefetch')))
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
    split = data_field(cfg, 'eval_split')
    source = make_source(cfg, split, process_index, process_count)
    parallel = parallel_calls(cfg)
    if preprocess is None:
        preprocess = classification.eval_preprocess(cfg)
    ds = numbered_examples(source.eval_stream(cfg), decode_whole(source.load), preprocess, parallel)
    ds = ds.batch(local_batch_size, drop_remainder=False)
    ds = ds.prefetch(int(data_field(cfg, 'prefetch')))
    num_batches = -(-source.max_shard_examples // local_batch_size)
    return EvalIterator(
        ds.with_options(_options(cfg)),
        return_ids,
        _stream_ids(lambda seq: source.eval_stream(cfg).skip(seq)),
        local_batch_size,
        num_batches,
        int(data_field(cfg, 'image_size')),
        source.num_examples,
    )


class ExampleIterator(_BaseIterator):
    """The examples that decoded, in shard order (with ``seq``); the corrupt ones (numbers
    missing between them, or after the last) are recorded like the batched iterators do."""

    def __init__(self, ds, ids_at, num_examples: int):
        super().__init__(ds, True, ids_at)
        self._next = 0
        self._num_examples = num_examples

    def __next__(self):
        try:
            example = next(self._it)
        except StopIteration:
            self._skip_to(self._num_examples)
            raise
        self._skip_to(int(example['seq']))
        self._next += 1
        return example

    def _skip_to(self, seq: int) -> None:
        if seq > self._next:
            self._record_corrupt(np.arange(self._next, seq))
        self._next = max(self._next, seq)


def create_eval_examples(
    data_config, *, preprocess, process_index: int = 0, process_count: int = 1
) -> ExampleIterator:
    """One pass over this process's shard of the eval split, one example at a time (numpy
    dicts of ``preprocess``, which may differ in shape); corrupt files are skipped, counted
    and named."""
    cfg = data_config
    split = data_field(cfg, 'eval_split')
    source = make_source(cfg, split, process_index, process_count)
    ds = numbered_examples(
        source.eval_stream(cfg), decode_whole(source.load), preprocess, parallel_calls(cfg)
    )
    ds = ds.prefetch(int(data_field(cfg, 'prefetch')))
    return ExampleIterator(
        ds.with_options(_options(cfg)),
        _stream_ids(lambda seq: source.eval_stream(cfg).skip(seq)),
        source.num_examples,
    )
