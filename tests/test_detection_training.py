"""Detection as a task of the one trainer: the recipe's schedule, the on-device normalisation, a
tiny RetinaNet trained, resumed and evaluated (COCO box AP) through train.py, and ImageNet
weights going into the backbone."""

from __future__ import annotations

import importlib
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import _metrics, _saved_state, demo_writer, run_train_py, train_py_env

from crossformer_jax import models
from crossformer_jax.tasks.detection import DetectionTask, normalize_canvas
from crossformer_jax.training import optimizer


def test_recipe_schedule_warms_up_then_steps_down_after_epochs_8_and_11():
    config = importlib.import_module('configs.detection.retinanet_crossformer_s_coco').get_config()
    steps_per_epoch = 7330  # COCO train2017 at batch 16
    schedule = optimizer.create_learning_rate_schedule(config, steps_per_epoch, 12 * 7330)
    peak = 1e-4
    for step, expected in [
        (0, peak * 1e-3),
        (250, peak * (1 - 0.5 * (1 - 1e-3))),
        (500, peak),
        (8 * 7330 - 1, peak),
        (8 * 7330, peak * 0.1),
        (11 * 7330 - 1, peak * 0.1),
        (11 * 7330, peak * 0.01),
        (12 * 7330, peak * 0.01),
    ]:
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5)


def test_canvas_is_normalised_inside_each_image_and_zero_outside():
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
    sizes = np.array([[64, 80], [40, 96]], np.int32)
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    out = np.asarray(normalize_canvas(jnp.asarray(images), jnp.asarray(sizes), mean, std))
    expected = (images.astype(np.float32) - np.float32(mean)) / np.float32(std)
    np.testing.assert_allclose(out[0, :, :80], expected[0, :, :80], rtol=1e-6)
    np.testing.assert_allclose(out[1, :40], expected[1, :40], rtol=1e-6)
    assert not out[0, :, 80:].any() and not out[1, 40:].any()


# -------------------------------------------------------------------------------------------------
# Through train.py.

CONFIG = """
from configs.detection import demo


def get_config():
    config = demo.get_config()
    config.model.embed_dim = 16
    config.model.fpn_channels = 16
    config.model.head_channels = 16
    config.model.num_head_convs = 1
    config.data.data_dir = {data_dir!r}
    config.data.num_parallel_calls = 1
    config.data.prefetch = 1
    config.batch_size = 4
    config.eval_batch_size = 4
    config.num_train_steps = 6
    config.warmup_steps = 2
    config.log_every_steps = 1
    config.eval_every_steps = 6
    config.checkpoint_every_steps = 3
    config.keep_checkpoints = 3
    return config
"""


@pytest.fixture(scope='module')
def run_env(tmp_path_factory):
    root = tmp_path_factory.mktemp('detection_training')
    write = demo_writer('make_detection_demo', 'write_detection_demo')
    write(str(root / 'data'), num_train=16, num_val=6)
    return train_py_env(root, CONFIG.format(data_dir=str(root / 'data')))


@pytest.fixture(scope='module')
def trained(run_env):
    """One uninterrupted 6-step run (checkpoints at steps 3 and 6, evaluation at 6)."""
    workdir = run_env['root'] / 'run'
    result = run_train_py(run_env, workdir)
    return {'workdir': workdir, 'stderr': result.stderr}


def test_train_then_evaluate_throughrun_train_py(run_env, trained):
    workdir = trained['workdir']
    assert 'Final validation box AP' in trained['stderr']
    assert 'Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all' in trained['stderr']
    losses = [m['train/loss'] for m in _metrics(workdir) if 'train/loss' in m]
    assert len(losses) == 6 and all(np.isfinite(losses))
    evals = [m for m in _metrics(workdir) if 'eval/AP' in m]
    assert len(evals) == 1 and 0.0 <= evals[0]['eval/AP'] <= 1.0
    result = run_train_py(run_env, workdir, mode='evaluate')
    assert 'box AP' in result.stdout + result.stderr and '6 images' in result.stdout + result.stderr


def test_resumed_detection_run_is_exact(run_env, trained):
    """Resuming from the step-3 checkpoint reproduces steps 4-6 bit for bit: the batches of both
    orientations, their flips, parameters, optimizer state and the logged losses."""
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
    from crossformer_jax.training import trainer
    from crossformer_jax.weights import pretrained

    geometry = dict(
        embed_dim=16,
        depths=(1, 1, 1, 1),
        num_heads=(1, 2, 4, 8),
        group_size=(4, 4, 4, 4),
        interval=(8, 4, 2, 1),
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
        'retinanet_crossformer_small',
        num_classes=5,
        fpn_channels=16,
        head_channels=16,
        num_head_convs=1,
        **geometry,
    )
    det_shapes = jax.eval_shape(model.init, jax.random.key(0), images)['params']
    fresh = jax.tree.map(lambda x: np.full(x.shape, -1.0, x.dtype), det_shapes)
    task = DetectionTask(num_classes=5, data=None)
    loaded = trainer.load_pretrained_params(str(tmp_path / 'classifier'), fresh, task)
    jax.tree.map(
        np.testing.assert_array_equal,
        loaded['backbone'],
        {k: v for k, v in weights.items() if k not in ('norm', 'head')},
    )
    for head in ('neck', 'bbox_head'):
        assert all(np.all(x == -1.0) for x in jax.tree.leaves(loaded[head]))
