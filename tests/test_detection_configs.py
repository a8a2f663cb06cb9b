"""Every config under configs/detection: the recipe numbers of the 1x and 3x schedules (epochs,
decay epochs, weight decay and its rule, training geometry, model), the 3x learning rate over
its 36 epochs, and the 3x weight-decay rule against Swin Transformer's rule on the PyTorch
names."""

import glob
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REPO

from crossformer_jax import create_model
from crossformer_jax.data import coco
from crossformer_jax.training import optimizer
from crossformer_jax.weights import convert

# config module -> (model name, schedule, drop path rate)
RECIPES = {
    'retinanet_crossformer_s_coco': ('retinanet_crossformer_small', '1x', 0.2),
    'retinanet_crossformer_b_coco': ('retinanet_crossformer_base', '1x', 0.3),
    'retinanet_crossformer_pp_s_coco': ('retinanet_crossformer_pp_small', '1x', 0.2),
    'mask_rcnn_crossformer_s_coco_1x': ('mask_rcnn_crossformer_small', '1x', 0.2),
    'mask_rcnn_crossformer_b_coco_1x': ('mask_rcnn_crossformer_base', '1x', 0.3),
    'mask_rcnn_crossformer_pp_s_coco_1x': ('mask_rcnn_crossformer_pp_small', '1x', 0.2),
    'mask_rcnn_crossformer_s_coco_3x': ('mask_rcnn_crossformer_small', '3x', 0.2),
    'mask_rcnn_crossformer_b_coco_3x': ('mask_rcnn_crossformer_base', '3x', 0.3),
    'cascade_mask_rcnn_crossformer_s_coco_3x': ('cascade_mask_rcnn_crossformer_small', '3x', 0.2),
}
# The small CPU demos: their own optimisation, the 1x geometry.
DEMOS = {'demo': 'retinanet_crossformer_small', 'mask_rcnn_demo': 'mask_rcnn_crossformer_small'}
SCHEDULES = {
    # epochs, decay epochs, weight decay, weight-decay rule, training geometry
    '1x': (12, (8, 11), 1e-4, 'all', 'resize'),
    '3x': (36, (27, 33), 0.05, 'no_norm', 'multiscale_crop'),
}


def _config(module):
    return importlib.import_module(f'configs.detection.{module}').get_config()


def test_every_detection_config_is_listed():
    paths = glob.glob(os.path.join(REPO, 'configs', 'detection', '*.py'))
    modules = {os.path.basename(p)[:-3] for p in paths} - {'__init__', 'common'}
    assert modules == set(RECIPES) | set(DEMOS)


@pytest.mark.parametrize('module', sorted(RECIPES))
def test_recipe_numbers(module):
    config = _config(module)
    name, schedule, drop_path = RECIPES[module]
    epochs, decay_epochs, weight_decay, rule, geometry = SCHEDULES[schedule]
    assert config.model.name == name and config.model.drop_path_rate == drop_path
    two_stage = 'mask_rcnn' in name
    assert config.task == ('instance_segmentation' if two_stage else 'detection')
    assert config.data.masks == two_stage
    assert (config.num_epochs, tuple(config.lr_decay_epochs)) == (epochs, decay_epochs)
    assert (config.weight_decay, config.weight_decay_rule) == (weight_decay, rule)
    assert config.data.train_augment == geometry
    # Shared by both schedules.
    assert (config.batch_size, config.base_lr, config.lr_reference_batch) == (16, 1e-4, 16)
    assert (config.adam_b1, config.adam_b2, config.grad_clip_norm) == (0.9, 0.999, 0.0)
    assert (config.lr_schedule, config.warmup_steps, config.warmup_ratio) == ('step', 500, 1e-3)
    assert tuple(config.data.image_scale) == (1333, 800) and config.data.hflip
    assert config.data.dataset == 'coco' and config.data.eval_split == 'val2017'
    if geometry == 'multiscale_crop':
        assert coco.MultiScaleCrop.from_config(config.data) == coco.MultiScaleCrop(
            1333, tuple(range(480, 801, 32)), (400, 500, 600), (384, 600)
        )


@pytest.mark.parametrize('module', sorted(DEMOS))
def test_demo_configs_load(module):
    config = _config(module)
    assert config.model.name == DEMOS[module]
    assert config.data.train_augment == 'resize'


def test_3x_learning_rate_over_36_epochs():
    config = _config('mask_rcnn_crossformer_s_coco_3x')
    steps_per_epoch = 7330  # COCO train2017 at batch 16
    schedule = optimizer.create_learning_rate_schedule(config, steps_per_epoch, 36 * 7330)
    peak = 1e-4
    for step, expected in [
        (0, peak * 1e-3),
        (500, peak),
        (27 * 7330 - 1, peak),
        (27 * 7330, peak * 0.1),
        (33 * 7330 - 1, peak * 0.1),
        (33 * 7330, peak * 0.01),
        (36 * 7330, peak * 0.01),
    ]:
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5)


def test_3x_weight_decay_rule_is_swins_on_the_pytorch_names():
    """Swin's 3x configs set decay_mult 0 for every parameter whose name contains 'norm',
    'relative_position_bias_table' or 'absolute_pos_embed'; on the PyTorch names of the Cascade
    Mask R-CNN (backbone LayerNorms, the DPB's, the box heads' BatchNorms) the config's rule
    must decay exactly the others."""
    config = _config('cascade_mask_rcnn_crossformer_s_coco_3x')
    model = create_model(config.model.name, num_classes=80)
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), images)['params']
    decayed = optimizer.DECAY_RULES[config.weight_decay_rule](params)
    # One element per parameter, 1 where it is decayed; the converter names it.
    flags = jax.tree.map(lambda p, d: np.full((1,) * p.ndim, d, np.float32), params, decayed)
    torch_flags = convert.flax_to_torch_state_dict({'params': flags})
    swin_exempt = ('norm', 'relative_position_bias_table', 'absolute_pos_embed')
    for key, flag in torch_flags.items():
        assert bool(flag.item()) == (not any(word in key for word in swin_exempt)), key
    exempt = sorted(key for key, flag in torch_flags.items() if not flag.item())
    assert len(exempt) == 2 * (1 + 2 * 12 + 3)  # patch_embed, norm1/2 of 12 blocks, 3 merges
    assert any('.pos.pos1.0.' in key for key in torch_flags)  # the DPB LayerNorms: decayed
    assert any('.bn.' in key for key in torch_flags)  # the cascade's BatchNorms: decayed
