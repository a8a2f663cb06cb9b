"""Tests of the timm-style model API: num_classes=0, features_only with out_indices, and logits
with the stage maps in one call."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from random_weights import random_variables

from crossformer_jax.models import create_model

TINY = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4))
IMAGES = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))


@pytest.fixture(scope='module')
def classifier():
    model = create_model('crossformer_tiny', num_classes=7, **TINY)
    return model, random_variables(model)


def backbone_variables(variables):
    return {'params': {k: v for k, v in variables['params'].items() if k not in ('norm', 'head')}}


def test_num_classes_0_gives_the_pooled_normed_features(classifier):
    model, variables = classifier
    pooled_model = create_model('crossformer_tiny', num_classes=0, **TINY)
    params = {k: v for k, v in variables['params'].items() if k != 'head'}
    abstract = jax.eval_shape(pooled_model.init, jax.random.PRNGKey(0), IMAGES)
    assert set(abstract['params']) == set(params)
    pooled = jax.jit(pooled_model.apply)({'params': params}, IMAGES)
    assert pooled.shape == (2, 8 * 16) and pooled.dtype == jnp.float32
    head = variables['params']['head']
    np.testing.assert_allclose(
        pooled @ head['kernel'] + head['bias'], jax.jit(model.apply)(variables, IMAGES), atol=1e-5
    )


def test_out_indices_select_stages(classifier):
    _, variables = classifier
    params = backbone_variables(variables)
    every = create_model('crossformer_tiny', features_only=True, **TINY).apply(params, IMAGES)
    assert [m.shape for m in every] == [
        (2, 16, 16, 16),
        (2, 8, 8, 32),
        (2, 4, 4, 64),
        (2, 2, 2, 128),
    ]
    chosen = create_model(
        'crossformer_tiny', features_only=True, out_indices=(-1, 1), **TINY
    ).apply(params, IMAGES)
    assert len(chosen) == 2
    np.testing.assert_array_equal(chosen[0], every[3])
    np.testing.assert_array_equal(chosen[1], every[1])


@pytest.mark.parametrize(
    'out_indices, features_only, message',
    [
        ((4,), True, 'out of range'),
        ((-5,), True, 'out of range'),
        ((1, -3), True, 'distinct'),
        ((), True, 'distinct'),
        ((0.5,), True, 'integers'),
        ((0,), False, 'needs features_only'),
    ],
)
def test_bad_out_indices_are_refused(out_indices, features_only, message):
    with pytest.raises(ValueError, match=message):
        create_model(
            'crossformer_tiny', features_only=features_only, out_indices=out_indices, **TINY
        )


def test_return_features_gives_logits_and_the_stage_maps(classifier):
    model, variables = classifier
    logits, maps = model.apply(variables, IMAGES, return_features=True)
    np.testing.assert_array_equal(logits, model.apply(variables, IMAGES))
    backbone = create_model('crossformer_tiny', features_only=True, **TINY)
    for got, expected in zip(maps, backbone.apply(backbone_variables(variables), IMAGES)):
        np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match='return_features needs a classifier'):
        backbone.apply(backbone_variables(variables), IMAGES, return_features=True)


def test_negative_num_classes_is_refused():
    with pytest.raises(ValueError, match='num_classes must be >= 0'):
        create_model('crossformer_tiny', num_classes=-1)


def test_one_registry_serves_every_family():
    from crossformer_jax.models import registry

    classifiers = registry.list_models('classification')
    segmenters = registry.list_models('segmentation')
    detectors = registry.list_models('detection')
    instance_segmenters = registry.list_models('instance_segmentation')
    assert registry.list_models() == classifiers + segmenters + detectors + instance_segmenters
    assert 'crossformer_tiny' in classifiers and 'upernet_crossformer_small' in segmenters
    assert detectors == [
        'retinanet_crossformer_base',
        'retinanet_crossformer_pp_small',
        'retinanet_crossformer_small',
    ]
    assert instance_segmenters == [
        'cascade_mask_rcnn_crossformer_small',
        'mask_rcnn_crossformer_base',
        'mask_rcnn_crossformer_pp_small',
        'mask_rcnn_crossformer_small',
    ]
    spec = registry.model_spec('fpn_crossformer_small')
    assert (spec.task, spec.num_classes) == ('segmentation', 150)
    assert create_model('fpn_crossformer_small').num_classes == 150
    with pytest.raises(ValueError, match=r"unknown model 'nope'; available: crossformer_base"):
        registry.model_spec('nope')
    with pytest.raises(ValueError, match="model 'crossformer_tiny' is already registered"):
        registry.register_model(
            'crossformer_tiny', task='classification', num_classes=1, build=spec.build
        )
