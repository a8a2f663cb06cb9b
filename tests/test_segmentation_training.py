"""Segmentation data and training: ADE20K-layout source, augmentation (same draws for image and
labels, nearest for labels, ignore index), whole-image evaluation inputs, and a tiny Semantic FPN
trained, resumed and evaluated through train.py."""

from __future__ import annotations

import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from helpers import _metrics, _saved_state, demo_writer, run_train_py, train_py_env
from PIL import Image

from crossformer_jax import models
from crossformer_jax.data import ade20k, pipeline, sources

PALETTE = np.array(
    [[250, 10, 10], [10, 250, 10], [10, 10, 250], [250, 250, 10], [10, 250, 250]], np.uint8
)


def _data_config(data_dir, **changes):
    config = ml_collections.ConfigDict(
        {
            'dataset': 'ade20k',
            'data_dir': str(data_dir),
            'train_split': 'training',
            'eval_split': 'validation',
            'num_classes': 4,
            'reduce_zero_label': True,
            'image_size': 32,
            'scale': (48, 32),
            'ratio_range': (0.5, 2.0),
            'cat_max_ratio': 0.75,
            'hflip': True,
            'photometric_distortion': False,
            'mean': (0.0, 0.0, 0.0),
            'std': (1.0, 1.0, 1.0),
            'num_parallel_calls': 1,
            'prefetch': 1,
        }
    )
    config.update(changes)
    return config


def _write_split(root, split, count, rng, size=(40, 56)):
    """Images coloured by their PNG label: PALETTE[v] where the annotation holds v (0..4)."""
    os.makedirs(os.path.join(root, 'images', split), exist_ok=True)
    os.makedirs(os.path.join(root, 'annotations', split), exist_ok=True)
    for i in range(count):
        label = np.zeros(size, np.uint8)
        for v in range(5):  # blocks of each value, including 0 (ignored)
            y, x = rng.randint(0, size[0] - 12), rng.randint(0, size[1] - 12)
            label[y : y + 12, x : x + 12] = v
        label[:, : size[1] // 4] = 1 + i % 4  # left strip: one class per image
        Image.fromarray(PALETTE[label]).save(os.path.join(root, 'images', split, f'{i:03d}.png'))
        Image.fromarray(label).save(os.path.join(root, 'annotations', split, f'{i:03d}.png'))


@pytest.fixture(scope='module')
def ade_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('ade')
    rng = np.random.RandomState(0)
    _write_split(str(root), 'training', 8, rng)
    _write_split(str(root), 'validation', 3, rng)
    return root


def _palette_index(image):
    """Label of each pixel from its colour (nearest palette entry)."""
    distances = np.abs(image[..., None, :] - PALETTE[None, None].astype(np.float32)).sum(-1)
    return np.argmin(distances, axis=-1)


def test_training_examples_keep_image_and_labels_aligned(ade_dir):
    config = _data_config(ade_dir)
    info = sources.get_dataset_info(config)
    assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (4, 8, 3)
    iterator = pipeline.create_train_iterator(
        config,
        local_batch_size=4,
        seed=3,
        decode=pipeline.decode_whole,
        preprocess=ade20k.train_preprocess(config, 3, 0),
        return_ids=True,
    )
    agreement = []
    for _ in range(4):  # two epochs: many scales, crops and flips
        batch = next(iterator)
        assert batch['image'].shape == (4, 32, 32, 3) and batch['label'].shape == (4, 32, 32)
        for image, label in zip(batch['image'], batch['label']):
            assert set(np.unique(label)) <= {0, 1, 2, 3, 255}  # nearest: no blended values
            padded = np.all(image == 0, axis=-1)
            np.testing.assert_array_equal(label[padded], 255)  # padding is ignored
            real = (label != 255) & ~padded
            # reduce_zero_label: PNG v -> v - 1, so colour index = label + 1.
            agreement.append(np.mean(_palette_index(image)[real] == label[real] + 1))
    # Bilinear image vs nearest labels differ only along block edges.
    assert np.mean(agreement) > 0.9 and min(agreement) > 0.75, agreement


def test_same_stream_after_restart(ade_dir):
    config = _data_config(ade_dir, photometric_distortion=True)

    def batches(start_step, count):
        iterator = pipeline.create_train_iterator(
            config,
            local_batch_size=2,
            seed=0,
            start_step=start_step,
            decode=pipeline.decode_whole,
            preprocess=ade20k.train_preprocess(config, 0, 0),
        )
        return [next(iterator) for _ in range(count)]

    full = batches(0, 5)
    resumed = batches(3, 2)
    for a, b in zip(full[3:], resumed):
        np.testing.assert_array_equal(a['image'], b['image'])
        np.testing.assert_array_equal(a['label'], b['label'])


def test_resize_nearest_follows_opencv_rule():
    label = tf.constant(np.arange(35, dtype=np.uint8).reshape(5, 7))
    out = ade20k.resize_nearest(label, 8, 3).numpy()
    rows = np.floor(np.arange(8) * 5 / 8).astype(int)
    cols = np.floor(np.arange(3) * 7 / 3).astype(int)
    np.testing.assert_array_equal(out, np.arange(35).reshape(5, 7)[rows][:, cols])


def test_rescale_size_fits_long_and_short_targets():
    # 1000x400 (h x w) into (2048, 512): min(2048/1000, 512/400) = 1.28 -> 1280 x 512.
    h, w = ade20k.rescale_size(1000, 400, (2048, 512))
    assert (int(h), int(w)) == (1280, 512)
    h, w = ade20k.rescale_size(300, 500, (2048, 512), ratio=0.5)
    assert (int(h), int(w)) == (256, 427)  # factor min(1024/500, 256/300) = 0.8533


def test_crop_avoids_a_dominating_class():
    # Class 1 is a 16-px strip on the right; a 32x32 crop at column x is acceptable (no class
    # covering 75% or more) only for x >= 25, about one draw in four.
    label = np.zeros((64, 64), np.uint8)
    label[:, 48:] = 1
    image = tf.zeros((64, 64, 3), tf.uint8)

    def acceptable(crop):
        counts = np.bincount(crop.numpy().ravel(), minlength=2)
        return counts.min() > 0 and counts.max() / counts.sum() < 0.75

    checked, plain = 0, 0
    for k in range(20):
        seed = tf.constant([k, 7], tf.int64)
        for ratio in (0.75, 1.0):
            _, crop = ade20k.random_crop(
                image, tf.constant(label), seed, size=32, cat_max_ratio=ratio
            )
            assert crop.shape == (32, 32)
            if ratio < 1:
                checked += acceptable(crop)
            else:
                plain += acceptable(crop)
    assert checked >= 15 and plain <= 10, (checked, plain)


def test_eval_examples_at_every_scale_and_original_labels(ade_dir):
    config = _data_config(ade_dir)
    examples = list(ade20k.create_eval_examples(config, scales=(0.5, 1.0, 1.75), process_count=1))
    assert len(examples) == 3
    for example in examples:
        assert example['label'].shape == (40, 56)
        assert set(np.unique(example['label'])) <= {0, 1, 2, 3, 255}
        # 40x56 fitted to (48r, 32r): factor 32r / 40; then up to multiples of 32.
        shapes = [image.shape for image in example['images']]
        assert shapes == [(32, 32, 3), (32, 64, 3), (64, 96, 3)]
    # Two processes split the files 0, 2 / 1.
    shards = [
        [
            e['id']
            for e in ade20k.create_eval_examples(
                config, scales=(1.0,), process_index=i, process_count=2
            )
        ]
        for i in range(2)
    ]
    assert [len(s) for s in shards] == [2, 1] and not set(shards[0]) & set(shards[1])


def test_corrupt_pairs_are_skipped_and_missing_annotations_named(ade_dir, tmp_path):
    root = tmp_path / 'ade'
    import shutil

    shutil.copytree(ade_dir, root)
    with open(root / 'images' / 'validation' / '001.png', 'wb') as f:
        f.write(b'not an image')
    config = _data_config(root)
    examples = ade20k.create_eval_examples(config, scales=(1.0,))
    ids = [os.path.basename(e['id'].decode()) for e in examples]
    assert ids == ['000.png', '002.png'] and examples.corrupt_count == 1
    os.remove(root / 'annotations' / 'validation' / '002.png')
    with pytest.raises(ValueError, match=r'have no <stem>.png .* e.g. 002.png'):
        ade20k.create_eval_examples(config, scales=(1.0,))


# -------------------------------------------------------------------------------------------------
# Through train.py.

CONFIG = """
from configs.segmentation import digits_demo


def get_config():
    config = digits_demo.get_config()
    config.model.embed_dim = 16
    config.model.head_channels = 16
    config.model.neck_channels = 16
    config.data.data_dir = {data_dir!r}
    config.data.num_parallel_calls = 1
    config.data.prefetch = 1
    config.batch_size = 4
    config.num_train_steps = 6
    config.log_every_steps = 1
    config.eval_every_steps = 6
    config.checkpoint_every_steps = 3
    config.keep_checkpoints = 3
    return config
"""


@pytest.fixture(scope='module')
def run_env(tmp_path_factory):
    root = tmp_path_factory.mktemp('segmentation_training')
    write = demo_writer('make_segmentation_demo', 'write_segmentation_demo')
    write(str(root / 'data'), num_train=12, num_validation=3)
    return train_py_env(root, CONFIG.format(data_dir=str(root / 'data')))


@pytest.fixture(scope='module')
def trained(run_env):
    """One uninterrupted 6-step run (checkpoints at steps 3 and 6, evaluation at 6)."""
    workdir = run_env['root'] / 'run'
    result = run_train_py(run_env, workdir)
    return {'workdir': workdir, 'stderr': result.stderr}


def test_train_then_evaluate_throughrun_train_py(run_env, trained):
    workdir = trained['workdir']
    assert 'Final validation mIoU' in trained['stderr']
    losses = [m['train/loss'] for m in _metrics(workdir) if 'train/loss' in m]
    assert len(losses) == 6 and all(np.isfinite(losses))
    evals = [m for m in _metrics(workdir) if 'eval/miou' in m]
    assert len(evals) == 1 and 0.0 <= evals[0]['eval/miou'] <= 1.0
    state = _saved_state(workdir, 6)
    assert 'batch_stats' in state['model_state']  # BatchNorm statistics are checkpointed

    result = run_train_py(run_env, workdir, '--config.eval.flip=True', mode='evaluate')
    assert 'mIoU' in result.stdout and 'aAcc' in result.stdout and 'mAcc' in result.stdout


def test_resumed_segmentation_run_is_exact(run_env, trained):
    """Resuming the uninterrupted run from its step-3 checkpoint reproduces steps 4-6 bit for bit:
    parameters, optimizer state, BatchNorm statistics and the logged losses."""
    workdir = run_env['root'] / 'resumed'
    shutil.copytree(trained['workdir'], workdir)
    shutil.rmtree(workdir / 'checkpoints' / '6')
    os.remove(workdir / 'metrics.jsonl')
    result = run_train_py(run_env, workdir)
    assert 'Resumed from' in result.stderr and 'at step 3.' in result.stderr
    a, b = _saved_state(trained['workdir'], 6), _saved_state(workdir, 6)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    full = {m['step']: m['train/loss'] for m in _metrics(trained['workdir']) if 'train/loss' in m}
    resumed = {m['step']: m['train/loss'] for m in _metrics(workdir) if 'train/loss' in m}
    assert sorted(resumed) == [4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)]


def test_classifier_weights_initialise_the_backbone(tmp_path):
    from crossformer_jax.tasks.segmentation import SegmentationTask
    from crossformer_jax.training import trainer
    from crossformer_jax.weights import pretrained

    geometry = dict(
        embed_dim=16,
        depths=(1, 1, 1, 1),
        num_heads=(1, 2, 4, 8),
        group_size=(4, 4, 4, 2),
        interval=(2, 1, 1, 1),
    )
    images = np.zeros((1, 64, 64, 3), np.float32)
    classifier = models.create_model('crossformer_small', num_classes=10, **geometry)
    shapes = jax.eval_shape(classifier.init, jax.random.key(0), images)['params']
    leaves, treedef = jax.tree.flatten(shapes)
    weights = jax.tree.unflatten(
        treedef, [np.full(x.shape, i + 1.0, x.dtype) for i, x in enumerate(leaves)]
    )
    pretrained.save_pretrained(
        tmp_path / 'classifier',
        {'params': weights},
        model_name='crossformer_small',
        num_classes=10,
        features_only=False,
        model_overrides=geometry,
    )
    model = models.create_model(
        'fpn_crossformer_small', num_classes=11, head_channels=16, neck_channels=16, **geometry
    )
    seg_shapes = jax.eval_shape(model.init, jax.random.key(0), images)['params']
    fresh = jax.tree.map(lambda x: np.full(x.shape, -1.0, x.dtype), seg_shapes)
    task = SegmentationTask(num_classes=11, image_size=64)
    loaded = trainer.load_pretrained_params(str(tmp_path / 'classifier'), fresh, task)
    jax.tree.map(
        np.testing.assert_array_equal,
        loaded['backbone'],
        {k: v for k, v in weights.items() if k not in ('norm', 'head')},
    )
    for head in ('neck', 'decode_head'):
        assert all(np.all(x == -1.0) for x in jax.tree.leaves(loaded[head]))
