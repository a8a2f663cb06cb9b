"""In-process checks of the other modes and of starting from a converted checkpoint: throughput,
fine-tuning at another resolution and class count, and bfloat16 loading. Small model, no data."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import init_params
from random_weights import random_variables

from configs import digits_demo
from crossformer_jax import tasks
from crossformer_jax.models import create_model
from crossformer_jax.training import trainer
from crossformer_jax.weights import pretrained

# The digits demo model (width 32, depths 1-1-2-1, groups of 4) on 32x32 images.
MODEL_FIELDS = ('embed_dim', 'depths', 'num_heads', 'group_size', 'interval')


def _config(**changes):
    config = digits_demo.get_config()
    config.batch_size = 4
    config.throughput.warmup_steps = 1
    config.throughput.num_steps = 2
    config.update_from_flattened_dict(changes)
    return config


def _init(model, image_size, seed):
    """Random parameters of the model's shapes (compiling model.init takes long)."""
    return random_variables(model, (image_size, image_size), seed)['params']


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
    """A converted-checkpoint directory of the demo model with 3 classes, trained at 32x32."""
    config = _config()
    overrides = {k: v for k, v in tasks.model_overrides(config).items() if k in MODEL_FIELDS}
    model = create_model('crossformer_tiny', num_classes=3, **overrides)
    params = _init(model, 32, seed=0)
    directory = str(tmp_path_factory.mktemp('converted') / 'demo')
    pretrained.save_pretrained(
        directory,
        {'params': params},
        model_name='crossformer_tiny',
        num_classes=3,
        features_only=False,
        model_overrides=overrides,
    )
    return directory, params


def test_throughput_mode_measures_a_rate():
    rate = trainer.measure_throughput(_config())
    assert math.isfinite(rate) and rate > 0


def test_fine_tuning_at_another_resolution_and_class_count(converted):
    directory, source = converted
    config = _config(**{'data.image_size': 64})
    model = trainer.create_model(config, num_classes=5)
    fresh = _init(model, 64, seed=1)
    loaded = trainer.load_pretrained_params(directory, fresh, tasks.get_task(config, 5))
    flat_loaded = jax.tree_util.tree_leaves_with_path(loaded)
    flat_source = dict(jax.tree_util.tree_leaves_with_path(source))
    flat_fresh = dict(jax.tree_util.tree_leaves_with_path(fresh))
    for path, value in flat_loaded:
        if jax.tree_util.keystr(path).startswith("['head']"):  # re-initialised: 3 -> 5 classes
            np.testing.assert_array_equal(value, flat_fresh[path])
            assert value.shape[-1] == 5
        else:  # the whole backbone and the final norm come from the checkpoint
            np.testing.assert_array_equal(value, flat_source[path])
    logits = jax.jit(model.apply)({'params': loaded}, jnp.ones((2, 64, 64, 3)))
    assert logits.shape == (2, 5) and bool(jnp.isfinite(logits).all())


@pytest.mark.parametrize(
    'change,message',
    [
        ({'model.embed_dim': 64}, 'does not fit config.model'),
        ({'model.depths': (1, 1, 1, 1)}, 'does not fit config.model'),
    ],
)
def test_fine_tuning_refuses_another_architecture(converted, change, message):
    directory, _ = converted
    config = _config(**change)
    model = trainer.create_model(config, num_classes=3)
    fresh = jax.eval_shape(lambda key: init_params(model, key, 32), jax.random.key(1))
    fresh = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), fresh)
    with pytest.raises(trainer.ConfigError, match=message):
        trainer.load_pretrained_params(directory, fresh, tasks.get_task(config, 3))


def test_load_pretrained_in_bfloat16(converted):
    directory, source = converted
    model, variables = pretrained.load_pretrained(directory, dtype='bfloat16')
    assert model.dtype == jnp.bfloat16
    assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype('float32')}
    np.testing.assert_array_equal(variables['params']['head']['kernel'], source['head']['kernel'])
    float_model, _ = pretrained.load_pretrained(directory)
    images = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    logits = jax.jit(model.apply)(variables, images)
    reference = jax.jit(float_model.apply)(variables, images)
    assert logits.dtype == jnp.float32
    scale = float(jnp.abs(reference).max())
    assert 0 < float(jnp.abs(logits - reference).max()) < 0.1 * scale
