"""Tests of the tf.data input pipeline on tiny image folders and a tiny fake
imagenet2012 TFDS dataset, all written to tmp_path."""

import functools
import io
import logging
import operator
import os
import tarfile

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from crossformer_jax.data import pipeline as ip
from crossformer_jax.data import sources

CLASSES = ('cat', 'dog', 'eel')
CORRUPT_TRAIN = ('dog/trunc.jpg', 'eel/garbage.jpg', 'eel/empty.png')
CORRUPT_EVAL = ('dog/broken.jpg',)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(autouse=True, scope='module')
def _fast_tf_graphs():
    """Skip Grappler while these tests build many tiny pipelines (saves ~1 s each)."""
    old = tf.config.optimizer.get_experimental_options()
    tf.config.optimizer.set_experimental_options({'disable_meta_optimizer': True})
    yield
    tf.config.optimizer.set_experimental_options(
        {'disable_meta_optimizer': old.get('disable_meta_optimizer', False)}
    )


def _encode(array, fmt):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def _write_folder(root, seed=0):
    rng = np.random.RandomState(seed)
    for split, per_class in (('train', 4), ('validation', 2)):
        for c in CLASSES:
            os.makedirs(root / split / c)
            for i in range(per_class):
                h, w = rng.randint(20, 40), rng.randint(20, 40)
                array = rng.randint(0, 256, (h, w, 3)).astype(np.uint8)
                fmt, ext = ('PNG', 'png') if i % 2 else ('JPEG', 'jpg')
                (root / split / c / f'{i}.{ext}').write_bytes(_encode(array, fmt))
    jpeg = _encode(rng.randint(0, 256, (30, 30, 3)).astype(np.uint8), 'JPEG')
    (root / 'train' / 'dog' / 'trunc.jpg').write_bytes(jpeg[: len(jpeg) // 2])
    (root / 'train' / 'eel' / 'garbage.jpg').write_bytes(b'not an image' * 10)
    (root / 'train' / 'eel' / 'empty.png').write_bytes(b'')
    (root / 'train' / 'cat' / 'notes.txt').write_text('ignored: not an image extension')
    (root / 'validation' / 'dog' / 'broken.jpg').write_bytes(jpeg[:200])


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('imgfolder')
    _write_folder(root)
    return root


def _cfg(root, **kw):
    cfg = dict(
        dataset='image_folder',
        data_dir=str(root),
        train_split='train',
        eval_split='validation',
        image_size=16,
        eval_crop_fraction=0.875,
        rrc_scale=(0.08, 1.0),
        rrc_ratio=(3 / 4, 4 / 3),
        hflip=True,
        randaugment='rand-m9-mstd0.5-inc1',
        random_erasing_prob=0.25,
        mean=MEAN,
        std=STD,
        shuffle_buffer=16,
        num_parallel_calls=2,
        prefetch=1,
    )
    cfg.update(kw)
    return ml_collections.ConfigDict(cfg)


def _files(root, split, corrupt=()):
    out = []
    for c in CLASSES:
        for name in sorted(os.listdir(root / split / c)):
            if name.endswith(('.jpg', '.png')) and f'{c}/{name}' not in corrupt:
                out.append(str(root / split / c / name))
    return out


def _ids(batch):
    return [x.decode() for x in batch['id']]


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_dataset_info(folder):
    info = sources.get_dataset_info(_cfg(folder))
    assert info == sources.DatasetInfo(
        num_classes=3, num_train_examples=15, num_eval_examples=7, class_names=CLASSES
    )


def test_train_batches_labels_and_corrupt_files(folder, caplog):
    cfg = _cfg(folder)
    before = ip.corrupt_image_count()
    it = ip.create_train_iterator(
        cfg,
        local_batch_size=5,
        seed=0,
        start_step=0,
        process_index=0,
        process_count=1,
        return_ids=True,
    )
    with caplog.at_level(logging.WARNING, logger=ip.logger.name):
        batches = _take(it, 6)  # 15 files, 5 per batch: two epochs
    valid = set(_files(folder, 'train', CORRUPT_TRAIN))
    corrupt = {str(folder / 'train' / c) for c in CORRUPT_TRAIN}
    for b in batches:
        assert set(b) == {'image', 'label', 'id'}
        assert b['image'].shape == (5, 16, 16, 3) and b['image'].dtype == np.uint8
        assert b['label'].shape == (5,) and b['label'].dtype == np.int32
        for path, label in zip(_ids(b), b['label']):
            assert path in valid  # corrupt files never reach a batch
            assert CLASSES[label] == os.path.basename(os.path.dirname(path))
    for epoch in (batches[:3], batches[3:]):
        assert (
            set(functools.reduce(operator.iadd, (_ids(b) for b in epoch), [])) == valid
        )  # each valid file seen
    # each corrupt file was met once per epoch
    assert it.corrupt_count == 6 and it.corrupt_files == corrupt
    assert ip.corrupt_image_count() - before == 6
    for path in corrupt:
        assert any(path in r.getMessage() for r in caplog.records)
    # raw pixels (normalisation happens on the device): the whole uint8 range is used
    images = np.concatenate([b['image'] for b in batches])
    assert images.min() < 10 and images.max() > 245


def test_determinism_and_exact_resume(folder):
    cfg = _cfg(folder)
    kw = dict(local_batch_size=4, process_index=0, process_count=1, return_ids=True)
    fresh = _take(ip.create_train_iterator(cfg, seed=7, start_step=0, **kw), 7)
    again = _take(ip.create_train_iterator(cfg, seed=7, start_step=0, **kw), 2)
    for a, b in zip(fresh, again):
        np.testing.assert_array_equal(a['image'], b['image'])
        np.testing.assert_array_equal(a['label'], b['label'])
    # start_step=4 crosses an epoch boundary (15 examples, batches of 4)
    resumed = _take(ip.create_train_iterator(cfg, seed=7, start_step=4, **kw), 3)
    for a, b in zip(fresh[4:], resumed):
        assert a['image'].tobytes() == b['image'].tobytes()  # bitwise
        np.testing.assert_array_equal(a['label'], b['label'])
        assert _ids(a) == _ids(b)
    other = _take(ip.create_train_iterator(cfg, seed=8, start_step=0, **kw), 1)[0]
    assert not np.array_equal(other['image'], fresh[0]['image'])


def test_process_sharding(folder):
    # Small config (no RandAugment) to keep the test quick.
    cfg = _cfg(folder, randaugment='', random_erasing_prob=0.0)
    seen_train, seen_eval, lengths = [], [], []
    for p in range(2):
        it = ip.create_train_iterator(
            cfg,
            local_batch_size=4,
            seed=0,
            start_step=0,
            process_index=p,
            process_count=2,
            return_ids=True,
        )
        # shard sizes 8 and 7: two batches cover an epoch of either
        seen_train.append(set(_ids(next(it)) + _ids(next(it))))
        ev = ip.create_eval_iterator(
            cfg, local_batch_size=3, process_index=p, process_count=2, return_ids=True
        )
        lengths.append(len(ev))
        batches = list(ev)
        assert len(batches) == len(ev)
        seen_eval.append([i for b in batches for i, m in zip(_ids(b), b['mask']) if m])
    assert not seen_train[0] & seen_train[1]
    assert seen_train[0] | seen_train[1] == set(_files(folder, 'train', CORRUPT_TRAIN))
    assert not set(seen_eval[0]) & set(seen_eval[1])
    assert sorted(seen_eval[0] + seen_eval[1]) == sorted(_files(folder, 'validation', CORRUPT_EVAL))
    # 7 eval files over 2 processes: shards of 4 and 3, both yield ceil(4/3) = 2 batches
    assert lengths == [2, 2]


def test_eval_padding_and_mask(folder):
    cfg = _cfg(folder)
    before = ip.corrupt_image_count()
    ev = ip.create_eval_iterator(
        cfg, local_batch_size=4, process_index=0, process_count=1, return_ids=True
    )
    batches = list(ev)
    assert len(batches) == len(ev) == 2  # 7 files
    for b in batches:
        assert set(b) == {'image', 'label', 'mask', 'id'}
        assert b['image'].shape == (4, 16, 16, 3) and b['image'].dtype == np.uint8
        assert b['label'].dtype == np.int32 and b['mask'].dtype == bool
    ids = [i for b in batches for i in _ids(b)]
    mask = np.concatenate([b['mask'] for b in batches])
    labels = np.concatenate([b['label'] for b in batches])
    images = np.concatenate([b['image'] for b in batches])
    broken = str(folder / 'validation' / 'dog' / 'broken.jpg')
    assert ids[:7] == _files(folder, 'validation') and ids[7] == ''  # file order, then pad
    np.testing.assert_array_equal(mask, [i not in (broken, '') for i in ids])
    assert not images[~mask].any()  # padding and the corrupt image are zeros
    for i, m, y in zip(ids, mask, labels):
        if m:
            assert CLASSES[y] == os.path.basename(os.path.dirname(i))
    assert ip.corrupt_image_count() - before == 1 and ev.corrupt_files == {broken}
    # without ids the batch has exactly the documented keys
    assert set(next(ip.create_eval_iterator(cfg, local_batch_size=4))) == {'image', 'label', 'mask'}


def test_eval_center_crop_geometry(tmp_path):
    # One 40x60 PNG: short side 40 = floor(20 / 0.5), so no resize; the centre
    # 20x20 crop starts at row 10, column 20.
    yy, xx = np.mgrid[0:40, 0:60]
    array = np.stack([yy * 6, xx * 4, (yy + xx) % 256], -1).astype(np.uint8)
    os.makedirs(tmp_path / 'validation' / 'a')
    (tmp_path / 'validation' / 'a' / 'x.png').write_bytes(_encode(array, 'PNG'))
    os.makedirs(tmp_path / 'train' / 'a')
    cfg = _cfg(tmp_path, image_size=20, eval_crop_fraction=0.5)
    batch = next(ip.create_eval_iterator(cfg, local_batch_size=2))
    np.testing.assert_array_equal(batch['image'][0], array[10:30, 20:40])
    np.testing.assert_array_equal(batch['mask'], [True, False])
    # With the standard fraction the short side becomes floor(20 / 0.875) = 22:
    # PIL's 22x33 bicubic resize (torchvision's Resize(22)) and a centred crop.
    cfg = _cfg(tmp_path, image_size=20)
    image = next(ip.create_eval_iterator(cfg, local_batch_size=1))['image'][0]
    ref = Image.fromarray(array).resize((33, 22), Image.Resampling.BICUBIC)
    ref = np.asarray(ref)[1:21, 6:26]
    np.testing.assert_array_equal(image, ref)


# ----------------------------------------------------------------------------
# imagenet2012 through TFDS (a tiny fake prepared from fake ILSVRC tar files)


def _tree(root):
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]


def _prepare_fake_imagenet(root, file_format):
    import tensorflow_datasets as tfds

    manual = root / 'manual'
    os.makedirs(manual)
    rng = np.random.RandomState(1)

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(manual / 'ILSVRC2012_img_train.tar', 'w') as outer:
        for synset in ('n01440764', 'n01443537'):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode='w') as t:
                for i in range(6):
                    data = _encode(rng.randint(0, 256, (24, 28, 3)).astype(np.uint8), 'JPEG')
                    if synset == 'n01443537' and i == 2:
                        data = b'garbage bytes, not a jpeg'
                    add(t, f'{synset}_{i}.JPEG', data)
            add(outer, synset + '.tar', inner.getvalue())
    with tarfile.open(manual / 'ILSVRC2012_img_val.tar', 'w') as t:
        for i in range(1, 6):
            data = _encode(rng.randint(0, 256, (30, 26, 3)).astype(np.uint8), 'JPEG')
            add(t, f'ILSVRC2012_val_{i:08d}.JPEG', data)
    builder = tfds.builder('imagenet2012', data_dir=str(root / 'data'))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual)),
        file_format=file_format,
    )
    return str(root / 'data')


@pytest.mark.parametrize('file_format', ['tfrecord', 'array_record'])
def test_tfds_imagenet2012(tmp_path, file_format):
    data_dir = _prepare_fake_imagenet(tmp_path, file_format)
    assert any(f.endswith(file_format) or file_format in f for f in _tree(data_dir))
    cfg = _cfg(
        tmp_path, dataset='imagenet2012', data_dir=data_dir, randaugment='', shuffle_buffer=4
    )
    info = sources.get_dataset_info(cfg)
    assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (1000, 12, 5)
    assert info.class_names[:2] == ('tench, Tinca tinca', 'goldfish, Carassius auratus')
    kw = dict(local_batch_size=3, seed=1, return_ids=True)
    seen, corrupt_files, corrupt_count = [], set(), 0
    for p in range(2):
        it = ip.create_train_iterator(cfg, start_step=0, process_index=p, process_count=2, **kw)
        fresh = _take(it, 5)  # shards of 6: epoch 0 is batches 0-1
        for b in fresh:
            assert b['image'].shape == (3, 16, 16, 3) and b['image'].dtype == np.uint8
            assert b['label'].dtype == np.int32
            for name, label in zip(_ids(b), b['label']):
                assert name != 'n01443537_2.JPEG'
                assert label == (0 if name.startswith('n01440764') else 1)
        seen.append(set(_ids(fresh[0]) + _ids(fresh[1])))
        resumed = _take(
            ip.create_train_iterator(cfg, start_step=3, process_index=p, process_count=2, **kw), 2
        )
        for a, b in zip(fresh[3:], resumed):
            assert a['image'].tobytes() == b['image'].tobytes()
            assert _ids(a) == _ids(b)
        corrupt_files |= it.corrupt_files
        corrupt_count += it.corrupt_count
    # the garbage record sits in one shard and was met in its epochs 0 and 1
    assert corrupt_files == {'n01443537_2.JPEG'} and corrupt_count >= 2
    all_valid = {f'n01440764_{i}.JPEG' for i in range(6)} | {
        f'n01443537_{i}.JPEG' for i in range(6) if i != 2
    }
    assert not seen[0] & seen[1] and seen[0] | seen[1] == all_valid

    ev = ip.create_eval_iterator(cfg, local_batch_size=4, return_ids=True)
    batches = list(ev)
    assert len(batches) == len(ev) == 2
    mask = np.concatenate([b['mask'] for b in batches])
    np.testing.assert_array_equal(mask, [True] * 5 + [False] * 3)
    names = sorted(i for b in batches for i, m in zip(_ids(b), b['mask']) if m)
    assert names == [f'ILSVRC2012_val_{i:08d}.JPEG' for i in range(1, 6)]


def _numbered(*seqs):
    """Fake tf.data batches of numbered examples: value = 10 * seq (-1 for epoch markers)."""
    return iter([{'seq': np.asarray(s), 'value': 10 * np.asarray(s)} for s in seqs])


def test_numbered_batches_regroup_by_number():
    # 2 and 5 dropped (5 is the last of its range: found missing only when 6 comes), a marker
    batches = ip.NumberedBatches(_numbered([0, 1, 3], [4, -1, 6], [7, 8, 9]))
    taken = [batches.take(stop) for stop in (3, 6, 9, 12)]
    np.testing.assert_array_equal(taken[0]['seq'], [0, 1])
    np.testing.assert_array_equal(taken[1]['seq'], [3, 4])
    np.testing.assert_array_equal(taken[2]['seq'], [6, 7, 8])
    np.testing.assert_array_equal(taken[2]['value'], [60, 70, 80])
    np.testing.assert_array_equal(taken[3]['seq'], [9])
    assert batches.exhausted and batches.take(15) is None
    # a whole range missing
    batches = ip.NumberedBatches(_numbered([0, 1], [6, 7]))
    assert batches.take(2)['seq'].tolist() == [0, 1]
    assert batches.take(4) is None
    assert batches.take(8)['seq'].tolist() == [6, 7]


def test_numbered_batches_raise_on_an_epoch_without_examples():
    batches = ip.NumberedBatches(_numbered([0, 1, -1], [-1, -1]))
    assert batches.take(2)['seq'].tolist() == [0, 1]
    with pytest.raises(RuntimeError, match='whole epoch'):
        batches.take(4)


def _corrupt_folder(root, good):
    """A train split of three corrupt files and `good` valid ones, one class."""
    jpeg = _encode(np.full((24, 24, 3), 200, np.uint8), 'JPEG')
    os.makedirs(root / 'train' / 'cat')
    for name, data in (('a.jpg', jpeg[:50]), ('b.jpg', b'garbage' * 9), ('c.png', b'')):
        (root / 'train' / 'cat' / name).write_bytes(data)
    for i in range(good):
        (root / 'train' / 'cat' / f'good{i}.jpg').write_bytes(jpeg)
    return _cfg(root, randaugment='', random_erasing_prob=0.0)


def test_train_batch_of_corrupt_files_only_holds_zeros(tmp_path):
    cfg = _corrupt_folder(tmp_path, good=1)
    it = ip.create_train_iterator(cfg, local_batch_size=1, seed=0, return_ids=True)
    batches = _take(it, 8)  # two epochs of 4 files
    for b in batches:
        assert b['image'].shape == (1, 16, 16, 3) and b['image'].dtype == np.uint8
        assert b['label'].shape == (1,) and b['label'].dtype == np.int32
    good = [b for b in batches if _ids(b)[0].endswith('good0.jpg')]
    assert len(good) == 2 and all(b['image'].min() > 150 for b in good)
    zeros = [b for b in batches if not _ids(b)[0].endswith('good0.jpg')]
    assert len(zeros) == 6 and not any(b['image'].any() for b in zeros)
    assert it.corrupt_count == 6 and len(it.corrupt_files) == 3


def test_train_split_without_one_readable_file_raises(tmp_path):
    cfg = _corrupt_folder(tmp_path, good=0)
    it = ip.create_train_iterator(cfg, local_batch_size=2, seed=0)
    with pytest.raises(RuntimeError, match='every file of the split is corrupt'):
        next(it)
