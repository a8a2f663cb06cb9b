"""Mask R-CNN and Cascade Mask R-CNN as a task of the one trainer: tiny models trained, resumed
and evaluated (box and mask AP with pycocotools) through train.py on COCO-format data with
polygon masks; the cascade's stages in process."""

from __future__ import annotations

import itertools
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import _metrics, _saved_state, demo_writer, run_train_py, train_py_env

import crossformer_jax
from crossformer_jax import tasks
from crossformer_jax.detection import two_stage_losses

CONFIG = """
from configs.detection import mask_rcnn_demo


def get_config():
    config = mask_rcnn_demo.get_config()
    config.model.embed_dim = 16
    config.model.fpn_channels = 16
    config.model.rpn_channels = 16
    config.model.box_fc_channels = 32
    config.model.box_conv_channels = 8  # the cascade's
    config.model.mask_channels = 16
    config.model.num_mask_convs = 1
    config.two_stage.update(
        train_pre_nms_top_k=100, train_proposals=32, test_pre_nms_top_k=100, test_proposals=32,
        rcnn_samples=16,
    )
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
    config.keep_checkpoints = 2
    return config
"""
CASCADE = ['--config.model.name=cascade_mask_rcnn_crossformer_small']
CASCADE += ['--config.two_stage.rcnn_box_loss=giou']


def test_two_stage_settings_are_checked():
    config = ml_collections.ConfigDict(
        {'task': 'instance_segmentation', 'data': {}, 'two_stage': {'rcnn_samples': 64}}
    )
    task = tasks.get_task(config, 5)
    assert task.setting('rcnn_samples') == 64 and task.setting('train_proposals') == 1000
    assert task.setting('rcnn_box_loss') == 'l1'
    for changes, message in (
        ({'proposals': 10}, r"unknown config.two_stage field\(s\) \['proposals'\]"),
        ({'rcnn_samples': 0}, 'config.two_stage.rcnn_samples must be a positive integer, got 0'),
        ({'rcnn_box_loss': 'l2'}, r"rcnn_box_loss must be one of \('l1', 'giou'\), got 'l2'"),
    ):
        config.two_stage = changes
        with pytest.raises(ValueError, match=message):
            tasks.get_task(config, 5)


def test_maskless_configs_are_refused():
    from configs.detection import mask_rcnn_demo

    config = mask_rcnn_demo.get_config()
    config.data.masks = False
    with pytest.raises(ValueError, match='config.data.masks must be True'):
        tasks.task_class(config).check_config(config, mode='compile')


def test_cascade_stages_refine_the_rois_and_weigh_their_losses(monkeypatch):
    """The cascade's loss in process: stage s samples at IoU 0.5 / 0.6 / 0.7 with its own box
    stds from the previous stage's refined RoIs (without the ground truths it added), with the
    GIoU box loss; every stage's BatchNorm statistics move. (Its training, gradients included,
    runs through train.py below.)"""
    model = crossformer_jax.create_model(
        'cascade_mask_rcnn_crossformer_small',
        3,
        embed_dim=16,
        depths=(1, 1, 1, 1),
        num_heads=(1, 2, 4, 8),
        group_size=(4, 4, 4, 4),
        fpn_channels=16,
        rpn_channels=8,
        box_conv_channels=8,
        box_fc_channels=32,
        mask_channels=8,
        num_mask_convs=1,
    )
    config = ml_collections.ConfigDict(
        {
            'task': 'instance_segmentation',
            'data': {'masks': True, 'mask_size': 28},
            'two_stage': dict(
                train_pre_nms_top_k=50, train_proposals=20, rcnn_samples=16, rcnn_box_loss='giou'
            ),
        }
    )
    task = tasks.get_task(config, 3)
    rng = np.random.default_rng(0)
    batch = {
        'image': jnp.asarray(rng.normal(size=(2, 64, 96, 3)), jnp.float32),
        'image_size': jnp.asarray([[64, 96], [60, 80]], jnp.int32),
        'boxes': jnp.asarray(
            [[[4, 6, 40, 50], [50, 10, 90, 60]], [[10, 10, 30, 40], [0, 0, 0, 0]]]
        ),
        'classes': jnp.asarray([[0, 2], [1, 0]], jnp.int32),
        'box_mask': jnp.asarray([[True, True], [True, False]]),
        'masks': jnp.asarray(rng.integers(0, 2, (2, 2, 28, 28)), jnp.uint8),
    }
    variables = model.init(jax.random.key(0), batch['image'])
    params, state = variables['params'], {'batch_stats': variables['batch_stats']}

    calls = []
    targets_of = two_stage_losses.rcnn_targets
    rcnn_loss_of = two_stage_losses.rcnn_loss

    def recording_targets(proposals, proposal_valid, *args, **kwargs):
        targets = targets_of(proposals, proposal_valid, *args, **kwargs)
        calls.append(dict(proposals=proposals, valid=proposal_valid, targets=targets, **kwargs))
        return targets

    def recording_loss(*args, **kwargs):
        loss, stats = rcnn_loss_of(*args, **kwargs)
        calls[-1]['loss_kwargs'] = kwargs
        return loss, stats

    monkeypatch.setattr(two_stage_losses, 'rcnn_targets', recording_targets)
    monkeypatch.setattr(two_stage_losses, 'rcnn_loss', recording_loss)

    def loss_and_records(params):
        calls.clear()
        loss, new_state = task.loss(model, params, state, batch, jax.random.key(1))
        arrays = [{k: c[k] for k in ('proposals', 'valid', 'targets')} for c in calls]
        return loss, (new_state, arrays)

    loss, (new_state, arrays) = jax.jit(loss_and_records)(params)
    for call, traced in zip(calls, arrays):
        call.update(traced)
    assert np.isfinite(loss) and len(calls) == 3
    assert [c['iou_threshold'] for c in calls] == [0.5, 0.6, 0.7]
    assert [c['box_stds'] for c in calls] == [
        (0.1, 0.1, 0.2, 0.2),
        (0.05, 0.05, 0.1, 0.1),
        (0.033, 0.033, 0.067, 0.067),
    ]
    assert all(c['loss_kwargs']['box_loss'] == 'giou' for c in calls)
    for before, after in itertools.pairwise(calls):
        previous = before['targets']
        # The next stage's candidates: the previous stage's valid samples that were not ground
        # truths (the first 2 candidates), moved by their deltas but staying in the image.
        expected_valid = np.asarray(previous['valid']) & (np.asarray(previous['indices']) >= 2)
        np.testing.assert_array_equal(after['valid'], expected_valid)
        assert after['proposals'].shape == previous['rois'].shape
        assert not np.allclose(after['proposals'], previous['rois'])
        assert np.all(np.asarray(after['proposals'])[..., 2] <= np.asarray([[96], [80]]))
    for stage in range(3):
        moved = jax.tree.map(
            lambda a, b: not np.array_equal(a, b),
            new_state['batch_stats']['roi_head'][f'bbox_head_{stage}'],
            state['batch_stats']['roi_head'][f'bbox_head_{stage}'],
        )
        assert all(jax.tree.leaves(moved))


@pytest.fixture(scope='module')
def run_env(tmp_path_factory):
    root = tmp_path_factory.mktemp('instance_segmentation_training')
    write = demo_writer('make_detection_demo', 'write_detection_demo')
    write(str(root / 'data'), num_train=12, num_val=6)
    return train_py_env(root, CONFIG.format(data_dir=str(root / 'data')))


@pytest.fixture(scope='module')
def trained_cascade(run_env):
    workdir = run_env['root'] / 'cascade'
    result = run_train_py(run_env, workdir, *CASCADE)
    return {'workdir': workdir, 'result': result}


def test_mask_rcnn_trains_and_evaluates_boxes_and_masks(run_env):
    workdir = run_env['root'] / 'mask_rcnn'
    result = run_train_py(run_env, workdir, '--config.num_train_steps=3')
    assert 'Final validation box AP' in result.stderr and 'mask AP' in result.stderr
    assert 'IoU=0.50:0.95 | area=   all' in result.stderr
    losses = [m['train/loss'] for m in _metrics(workdir) if 'train/loss' in m]
    assert len(losses) == 3 and all(np.isfinite(losses))
    evals = [m for m in _metrics(workdir) if 'eval/mask_AP' in m]
    assert len(evals) == 1 and 0.0 <= evals[0]['eval/mask_AP'] <= 1.0


def test_cascade_trains_and_evaluates(trained_cascade):
    workdir = trained_cascade['workdir']
    assert 'mask AP' in trained_cascade['result'].stderr
    losses = [m['train/loss'] for m in _metrics(workdir) if 'train/loss' in m]
    assert len(losses) == 6 and all(np.isfinite(losses))
    evals = [m for m in _metrics(workdir) if 'eval/mask_AP' in m]
    assert len(evals) == 1 and 0.0 <= evals[0]['eval/AP'] <= 1.0
    # The three box heads' BatchNorm statistics are saved, and moved from their initial values.
    stats = _saved_state(workdir, 6)['model_state']['batch_stats']['roi_head']
    for stage in range(3):
        mean = stats[f'bbox_head_{stage}']['shared_convs_0']['bn']['mean']
        assert np.abs(np.asarray(mean)).max() > 0


def test_resumed_cascade_run_is_exact(run_env, trained_cascade):
    """Resuming from the step-3 checkpoint reproduces steps 4-6 bit for bit: parameters,
    optimizer state, BatchNorm statistics and the logged losses."""
    workdir = run_env['root'] / 'resumed'
    shutil.copytree(trained_cascade['workdir'], workdir)
    shutil.rmtree(workdir / 'checkpoints' / '6')
    os.remove(workdir / 'metrics.jsonl')
    result = run_train_py(run_env, workdir, *CASCADE)
    assert 'Resumed from' in result.stderr and 'at step 3.' in result.stderr
    a, b = _saved_state(trained_cascade['workdir'], 6), _saved_state(workdir, 6)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    full = {
        m['step']: m['train/loss']
        for m in _metrics(trained_cascade['workdir'])
        if 'train/loss' in m
    }
    resumed = {m['step']: m['train/loss'] for m in _metrics(workdir) if 'train/loss' in m}
    assert sorted(resumed) == [4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)]
