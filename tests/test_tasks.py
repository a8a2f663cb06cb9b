"""Unit tests of the task interface: classification and segmentation losses, evaluation sums and
metrics, best-checkpoint selection, the segmentation recipe's schedule and weight-decay rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from crossformer_jax import tasks
from crossformer_jax.tasks import classification, segmentation
from crossformer_jax.training import checkpointing, optimizer, trainer


def test_get_task_follows_config_task():
    config = ml_collections.ConfigDict(
        {
            'mixup': {'mixup_alpha': 0.0},
            'data': {'image_size': 32},
            'eval': {'scales': (0.5, 1.0), 'flip': True},
            'aux_loss_weight': 0.4,
        }
    )
    task = tasks.get_task(config, 7)
    assert isinstance(task, classification.ClassificationTask)
    assert (task.best_metric, task.num_classes) == ('top1', 7)
    config.task = 'segmentation'
    task = tasks.get_task(config, 11)
    assert isinstance(task, segmentation.SegmentationTask)
    assert (task.best_metric, task.eval_scales, task.eval_flip) == ('miou', (0.5, 1.0), True)
    config.task = 'detection'
    task = tasks.get_task(config, 80)
    assert (type(task).__name__, task.best_metric, task.num_classes) == ('DetectionTask', 'AP', 80)
    config.task = 'keypoints'
    with pytest.raises(ValueError, match="unknown config.task 'keypoints'; available: "):
        tasks.get_task(config, 3)


def test_classification_eval_sums_count_only_real_rows():
    # Eight classes; row r ranks the classes by the logits below (highest first).
    logits = np.array(
        [
            [9, 8, 7, 6, 5, 4, 3, 2],  # label 0: top-1 hit
            [9, 8, 7, 6, 5, 4, 3, 2],  # label 4: top-5 hit only (5th best)
            [9, 8, 7, 6, 5, 4, 3, 2],  # label 5: neither (6th best)
            [2, 3, 4, 5, 6, 7, 8, 9],  # label 7: top-1 hit
            [9, 8, 7, 6, 5, 4, 3, 2],  # padding, label 0 would be a hit
            [2, 3, 4, 5, 6, 7, 8, 9],  # padding, label 7 would be a hit
        ],
        np.float32,
    )
    labels = np.array([0, 4, 5, 7, 0, 7], np.int32)
    mask = np.array([True, True, True, True, False, False])
    sums = jax.device_get(classification.eval_sums(jnp.asarray(logits), labels, mask))
    assert (float(sums['top1']), float(sums['top5']), float(sums['count'])) == (2.0, 3.0, 4.0)
    log_probs = jax.nn.log_softmax(logits[:4])
    expected_loss = -float(np.sum(np.asarray(log_probs)[np.arange(4), labels[:4]]))
    np.testing.assert_allclose(float(sums['loss']), expected_loss, rtol=1e-6)

    task = classification.ClassificationTask(
        num_classes=8, mixup=ml_collections.ConfigDict(), data=ml_collections.ConfigDict()
    )
    metrics = task.final_metrics(sums)
    assert metrics['top1'] == 0.5 and metrics['top5'] == 0.75 and metrics['count'] == 4
    assert 'top-1 50.00%' in task.describe(metrics)


def test_best_checkpoint_is_the_argmax_of_the_task_metric(tmp_path):
    state = {'w': jnp.zeros(3)}
    # mIoU picks step 2; top-1 (present but not the task's metric) would pick step 3.
    evaluations = {
        1: {'miou': 0.30, 'top1': 0.1},
        2: {'miou': 0.55, 'top1': 0.2},
        3: {'miou': 0.40, 'top1': 0.9},
        4: {'miou': 0.55, 'top1': 0.3},  # a tie does not replace the best
    }
    ckpts = checkpointing.Checkpoints(str(tmp_path), async_save=False, best_metric='miou')
    saved = {step: ckpts.save_if_best(step, state, m) for step, m in evaluations.items()}
    ckpts.wait()
    assert saved == {1: True, 2: True, 3: False, 4: False}
    best = max(evaluations, key=lambda s: (evaluations[s]['miou'], -s))
    assert ckpts.best_step() == best == 2
    assert ckpts.best_metrics()['miou'] == pytest.approx(0.55)
    ckpts.close()
    reopened = checkpointing.Checkpoints(str(tmp_path), async_save=False, best_metric='miou')
    assert reopened.best_step() == 2  # the choice survives a restart
    reopened.close()


def test_segmentation_metrics_on_hand_made_confusion_matrices():
    # Rows: label, columns: prediction. Class 2 never occurs and is never predicted.
    confusion = np.array([[8, 2, 0], [1, 4, 0], [0, 0, 0]])
    metrics = segmentation.segmentation_metrics(confusion)
    iou = [8 / (10 + 9 - 8), 4 / (5 + 6 - 4)]
    assert metrics['miou'] == pytest.approx(np.mean(iou))
    assert metrics['aacc'] == pytest.approx(12 / 15)
    assert metrics['macc'] == pytest.approx(np.mean([8 / 10, 4 / 5]))
    # A class that is predicted but never labelled has IoU 0 and counts in mIoU, not in mAcc.
    confusion = np.array([[6, 0, 4], [0, 5, 0], [0, 0, 0]])
    metrics = segmentation.segmentation_metrics(confusion)
    assert metrics['miou'] == pytest.approx((6 / 10 + 1 + 0) / 3)
    assert metrics['macc'] == pytest.approx((6 / 10 + 1) / 2)
    perfect = segmentation.segmentation_metrics(np.diag([3, 0, 7]))
    assert perfect == {'miou': 1.0, 'aacc': 1.0, 'macc': 1.0}
    with pytest.raises(ValueError, match='no labelled pixel'):
        segmentation.segmentation_metrics(np.zeros((2, 2)))


def test_confusion_matrix_skips_ignored_pixels():
    labels = jnp.array([[0, 1, 255], [2, 2, 1]])
    predictions = jnp.array([[0, 2, 1], [2, 0, 1]])
    confusion = np.asarray(segmentation.confusion_matrix(predictions, labels, 3))
    np.testing.assert_array_equal(confusion, [[1, 0, 0], [0, 1, 1], [1, 0, 1]])


def test_pixel_cross_entropy_ignores_but_counts_ignored_pixels():
    rng = np.random.RandomState(0)
    logits = rng.randn(2, 3, 4, 5).astype(np.float32)
    labels = rng.randint(0, 5, size=(2, 3, 4))
    labels[0, 0, :2] = 255
    log_probs = np.asarray(jax.nn.log_softmax(logits))
    valid = labels != 255
    expected = (
        -sum(log_probs[b, y, x, labels[b, y, x]] for b, y, x in zip(*np.nonzero(valid)))
        / labels.size
    )
    loss = segmentation.pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def _segmentation_recipe(name):
    import importlib

    return importlib.import_module(f'configs.segmentation.{name}_ade20k').get_config()


def test_poly_schedule_with_warmup():
    config = _segmentation_recipe('upernet_crossformer_small')
    schedule = optimizer.create_learning_rate_schedule(config, 1263, config.num_train_steps)
    total, peak = 160_000, 6e-5
    for step, expected in [
        (0, peak * 1e-6),
        (750, peak * (1 - 750 / total) * (1 - 0.5 * (1 - 1e-6))),
        (1500, peak * (1 - 1500 / total)),
        (80_000, peak * 0.5),
        (total, 0.0),
    ]:
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5, atol=1e-15)
    config = _segmentation_recipe('fpn_crossformer_base')
    schedule = optimizer.create_learning_rate_schedule(config, 1263, config.num_train_steps)
    np.testing.assert_allclose(float(schedule(0)), 1e-4, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(40_000)), 1e-4 * 0.5**0.9, rtol=1e-5)


def test_upernet_decays_everything_but_the_norm_layers():
    params = {
        'backbone': {
            'patch_embed': {'norm': {'scale': 0, 'bias': 0}, 'proj_0': {'kernel': 0}},
            'layers_0': {
                'blocks_0': {
                    'norm1': {'scale': 0},
                    'norm2': {'bias': 0},
                    'attn': {'pos': {'pos1_norm': {'scale': 0}}, 'qkv': {'bias': 0}},
                },
                'downsample': {'norm': {'scale': 0}},
            },
        },
        'decode_head': {'bottleneck': {'bn': {'scale': 0}, 'conv': {'kernel': 0}}},
    }
    mask = optimizer.DECAY_RULES['no_norm'](params)
    flat = {
        '/'.join(str(k.key) for k in path): v
        for path, v in jax.tree_util.tree_leaves_with_path(mask)
    }
    no_decay = sorted(k for k, v in flat.items() if not v)
    assert no_decay == [
        'backbone/layers_0/blocks_0/norm1/scale',
        'backbone/layers_0/blocks_0/norm2/bias',
        'backbone/layers_0/downsample/norm/scale',
        'backbone/patch_embed/norm/bias',
        'backbone/patch_embed/norm/scale',
    ]
    assert all(jax.tree.leaves(optimizer.DECAY_RULES['all'](params)))


def test_every_segmentation_config_is_valid():
    import glob
    import os

    names = set()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for path in sorted(glob.glob(os.path.join(repo, 'configs/segmentation/*_ade20k.py'))):
        config = _segmentation_recipe(os.path.basename(path)[: -len('_ade20k.py')])
        trainer.validate_config(config, mode='throughput', device_count=8)
        names.add(config.model.name)
        upernet = config.model.name.startswith('upernet')
        assert config.aux_loss_weight == (0.4 if upernet else 0.0)
        assert config.weight_decay_rule == ('no_norm' if upernet else 'all')
    from crossformer_jax.models import segmentation

    assert names == set(segmentation.SEGMENTATION_VARIANTS)
