"""Mask R-CNN as a task of the one trainer: a tiny model trained and evaluated (box and mask AP
with pycocotools) through train.py on COCO-format data with polygon masks."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest
from helpers import _metrics, demo_writer, run_train_py, train_py_env

from crossformer_jax import tasks

CONFIG = """
from configs.detection import mask_rcnn_demo


def get_config():
    config = mask_rcnn_demo.get_config()
    config.model.embed_dim = 16
    config.model.fpn_channels = 16
    config.model.rpn_channels = 16
    config.model.box_fc_channels = 32
    config.model.mask_channels = 16
    config.model.num_mask_convs = 1
    config.two_stage = dict(
        train_pre_nms_top_k=100, train_proposals=32, test_pre_nms_top_k=100, test_proposals=32,
        rcnn_samples=16,
    )
    config.data.data_dir = {data_dir!r}
    config.data.num_parallel_calls = 1
    config.data.prefetch = 1
    config.batch_size = 4
    config.eval_batch_size = 4
    config.num_train_steps = 4
    config.warmup_steps = 2
    config.log_every_steps = 1
    config.eval_every_steps = 4
    config.checkpoint_every_steps = 4
    return config
"""


def test_two_stage_settings_are_checked():
    config = ml_collections.ConfigDict(
        {'task': 'instance_segmentation', 'data': {}, 'two_stage': {'rcnn_samples': 64}}
    )
    task = tasks.get_task(config, 5)
    assert task.setting('rcnn_samples') == 64 and task.setting('train_proposals') == 1000
    config.two_stage = {'proposals': 10}
    with pytest.raises(ValueError, match=r"unknown config.two_stage field\(s\) \['proposals'\]"):
        tasks.get_task(config, 5)


def test_cascade_and_maskless_configs_are_refused():
    from configs.detection import mask_rcnn_demo

    config = mask_rcnn_demo.get_config()
    config.model.name = 'cascade_mask_rcnn_crossformer_small'
    with pytest.raises(ValueError, match='cascade is not supported yet'):
        tasks.task_class(config).check_config(config, mode='compile')
    config = mask_rcnn_demo.get_config()
    config.data.masks = False
    with pytest.raises(ValueError, match='config.data.masks must be True'):
        tasks.task_class(config).check_config(config, mode='compile')


@pytest.fixture(scope='module')
def run_env(tmp_path_factory):
    root = tmp_path_factory.mktemp('instance_segmentation_training')
    write = demo_writer('make_detection_demo', 'write_detection_demo')
    write(str(root / 'data'), num_train=12, num_val=6)
    return train_py_env(root, CONFIG.format(data_dir=str(root / 'data')))


def test_train_then_evaluate_boxes_and_masks_throughrun_train_py(run_env):
    workdir = run_env['root'] / 'run'
    result = run_train_py(run_env, workdir)
    assert 'Final validation box AP' in result.stderr and 'mask AP' in result.stderr
    assert 'IoU=0.50:0.95 | area=   all' in result.stderr
    losses = [m['train/loss'] for m in _metrics(workdir) if 'train/loss' in m]
    assert len(losses) == 4 and all(np.isfinite(losses))
    evals = [m for m in _metrics(workdir) if 'eval/mask_AP' in m]
    assert len(evals) == 1 and 0.0 <= evals[0]['eval/mask_AP'] <= 1.0
    result = run_train_py(run_env, workdir, mode='evaluate')
    output = result.stdout + result.stderr
    assert 'mask AP50' in output and '6 images' in output
