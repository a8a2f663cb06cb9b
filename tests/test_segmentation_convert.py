"""Conversion of MMSegmentation checkpoints (UPerNet / Semantic FPN on CrossFormer) and back."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict

from crossformer_jax.cli import convert as convert_cli
from crossformer_jax.models.segmentation import SEGMENTATION_VARIANTS
from crossformer_jax.reference.crossformer import randomize_parameters
from crossformer_jax.reference.segmentation import (
    create_torch_segmentation_model,
    randomize_batch_norm_statistics,
)
from crossformer_jax.weights import convert as C
from crossformer_jax.weights import pretrained as P
from crossformer_jax.weights import torch_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'convert_torch_weights.py')

TINY = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))


def random_state_dict(name, seed=0, num_classes=7, **overrides):
    model = create_torch_segmentation_model(name, num_classes, **overrides)
    randomize_parameters(model, seed)
    randomize_batch_norm_statistics(model, seed + 1)
    return model.state_dict()


@pytest.fixture(scope='module')
def upernet_state_dict():
    return random_state_dict('upernet_crossformer_small', head_channels=32, aux_channels=24, **TINY)


@pytest.fixture(scope='module')
def fpn_state_dict():
    return random_state_dict('fpn_crossformer_pp_small', head_channels=24, neck_channels=32, **TINY)


def assert_same_tree(a, b):
    flat_a, flat_b = flatten_dict(a), flatten_dict(b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        assert flat_a[key].dtype == flat_b[key].dtype, key
        np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=str(key))


@pytest.mark.parametrize(
    'name, fixture',
    [
        ('upernet_crossformer_small', 'upernet_state_dict'),
        ('fpn_crossformer_pp_small', 'fpn_state_dict'),
    ],
)
def test_conversion_and_its_inverse_are_bitwise_exact(name, fixture, request):
    state_dict = request.getfixturevalue(fixture)
    variables, report = C.convert_with_report(state_dict, name, **TINY)
    assert set(variables) == {'params', 'batch_stats'}
    assert report.num_classes == 7 and not report.features_only
    assert report.skipped_buffers == sorted(
        (k for k in state_dict if C.is_derived_buffer(k)), key=torch_io.natural_key
    )
    assert any(k.endswith('.num_batches_tracked') for k in report.skipped_buffers)
    assert report.num_params == sum(
        v.numel()
        for k, v in state_dict.items()
        if not k.endswith(C.DERIVED_BUFFER_SUFFIXES)
        and not k.endswith(('running_mean', 'running_var'))
    )
    bn = (
        'decode_head',
        'fpn_bottleneck' if name.startswith('upernet') else 'scale_heads_3_4',
        'bn',
    )
    torch_bn = (
        'decode_head.'
        + ('fpn_bottleneck' if name.startswith('upernet') else 'scale_heads.3.4')
        + '.bn'
    )
    np.testing.assert_array_equal(
        flatten_dict(variables['batch_stats'])[(*bn, 'var')], state_dict[f'{torch_bn}.running_var']
    )
    np.testing.assert_array_equal(
        flatten_dict(variables['params'])[(*bn, 'scale')], state_dict[f'{torch_bn}.weight']
    )

    exported = C.flax_to_torch_state_dict(variables)
    kept = {
        k: v
        for k, v in state_dict.items()
        if not k.endswith(('.attn.biases', '.attn.relative_position_index'))
    }
    assert exported.keys() == kept.keys()
    for key, value in kept.items():
        assert exported[key].dtype == value.numpy().dtype, key
        np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)
    # The exported state dict loads strictly into the PyTorch reference.
    reference = create_torch_segmentation_model(name, 7, **report.overrides)
    missing, unexpected = reference.load_state_dict(
        {k: torch.from_numpy(v) for k, v in exported.items()}, strict=False
    )
    assert unexpected == [] and all(C.is_derived_buffer(k) for k in missing)
    assert_same_tree(C.convert_torch_state_dict(exported, name, **TINY), variables)


@pytest.mark.parametrize('name', sorted(SEGMENTATION_VARIANTS))
def test_reference_state_dicts_of_every_model_match_the_flax_models(name):
    with torch.device('meta'):
        state_dict = create_torch_segmentation_model(name).state_dict()
    assert C.infer_model_name(state_dict) == name
    assert C.infer_model_name({f'module.{k}': v for k, v in state_dict.items()}) == name
    report = C.check_torch_state_dict(state_dict, name)
    assert report.num_classes == 150 and report.overrides == {}
    sd, skipped = torch_io.extract_state_dict(
        {'state_dict': state_dict, 'meta': {}}, keep_heads=True
    )
    assert sd.keys() == state_dict.keys() and skipped == []
    # Without keep_heads (and for --model <backbone>): the backbone alone, as for detection.
    backbone, skipped = torch_io.extract_state_dict({'state_dict': state_dict, 'meta': {}})
    assert skipped and all(k.startswith(torch_io.SEGMENTATION_PREFIXES) for k in skipped)
    assert C.check_torch_state_dict(backbone, SEGMENTATION_VARIANTS[name]['backbone']).features_only


def test_head_widths_are_read_from_the_shapes(upernet_state_dict):
    assert C.segmentation_overrides(upernet_state_dict, 'upernet_crossformer_small') == {
        'head_channels': 32,
        'aux_channels': 24,
    }
    without_aux = {
        k: v for k, v in upernet_state_dict.items() if not k.startswith('auxiliary_head.')
    }
    variables, report = C.convert_with_report(without_aux, 'upernet_crossformer_small', **TINY)
    assert report.overrides['aux_channels'] is None and 'auxiliary_head' not in variables['params']


def test_mismatches_are_all_listed(upernet_state_dict):
    bad = dict(upernet_state_dict)
    del bad['decode_head.psp_modules.2.1.bn.running_var']
    del bad['auxiliary_head.convs.0.conv.weight']
    bad['decode_head.fpn_convs.1.conv.weight'] = torch.zeros(32, 32, 1, 1)
    bad['decode_head.extra.weight'] = torch.zeros(3)
    with pytest.raises(C.StateDictMismatchError) as info:
        C.convert_torch_state_dict(bad, 'upernet_crossformer_small', **TINY)
    err = info.value
    assert err.missing == [
        'auxiliary_head.convs.0.conv.weight',
        'decode_head.psp_modules.2.1.bn.running_var',
    ]
    assert err.unexpected == ['decode_head.extra.weight']
    assert err.mismatched == {
        'decode_head.fpn_convs.1.conv.weight': ((32, 32, 3, 3), (32, 32, 1, 1))
    }
    assert 'segmentation model with 7 classes' in str(err)


def test_name_inference_errors(upernet_state_dict):
    with pytest.raises(C.ModelNameError, match='no registered CrossFormer variant matches'):
        C.infer_model_name(upernet_state_dict)  # embed_dim 16: no registered backbone
    with torch.device('meta'):
        tiny_backbone = dict(embed_dim=64, depths=(1, 1, 8, 6), num_heads=(2, 4, 8, 16))
        on_tiny = create_torch_segmentation_model('upernet_crossformer_small', **tiny_backbone)
        state_dict = create_torch_segmentation_model('upernet_crossformer_base').state_dict()
    with pytest.raises(C.ModelNameError, match='upernet_crossformer_tiny, which is not a regis'):
        C.infer_model_name(on_tiny.state_dict())
    headless = {k: v for k, v in state_dict.items() if not k.startswith('decode_head.')}
    with pytest.raises(C.ModelNameError, match='cannot tell the segmentation head'):
        C.infer_model_name(headless)


@pytest.fixture(scope='module')
def fpn_checkpoint(tmp_path_factory):
    """A full-size fpn_crossformer_pp_small checkpoint (mmseg layout, 'meta' next to the weights)
    with random weights and BatchNorm statistics (~110 MB)."""
    path = tmp_path_factory.mktemp('mmseg') / 'fpn_pp_small.pth'
    state_dict = random_state_dict('fpn_crossformer_pp_small', num_classes=150)
    torch.save({'meta': {'CLASSES': ['wall'], 'iter': 80000}, 'state_dict': state_dict}, path)
    return path, state_dict


def test_cli_converts_a_segmentation_checkpoint_and_load_pretrained_restores_it(
    tmp_path, fpn_checkpoint
):
    path, state_dict = fpn_checkpoint
    out = tmp_path / 'fpn'
    result = subprocess.run(
        [sys.executable, SCRIPT, '--checkpoint', str(path), '--output', str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert 'inferred model: fpn_crossformer_pp_small' in result.stdout
    assert 'segmentation, 150 classes' in result.stdout
    assert 'parameters: 27,061,578' in result.stdout
    metadata = json.loads((out / P.METADATA_FILE).read_text())
    assert metadata['model_name'] == 'fpn_crossformer_pp_small'
    assert metadata['num_classes'] == 150 and metadata['features_only'] is False

    model, variables = P.load_pretrained(out)
    assert set(variables) == {'params', 'batch_stats'}
    exported = C.flax_to_torch_state_dict(variables)
    for key, value in state_dict.items():
        np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)
    images = jax.ShapeDtypeStruct((1, 64, 96, 3), jnp.float32)
    assert jax.eval_shape(model.apply, variables, images).shape == (1, 64, 96, 150)

    # --model with a backbone name keeps today's behaviour: the backbone alone.
    backbone_out = tmp_path / 'backbone'
    assert (
        convert_cli.main(
            [
                '--checkpoint',
                str(path),
                '--output',
                str(backbone_out),
                '--model',
                'crossformer_pp_small',
            ]
        )
        == 0
    )
    assert json.loads((backbone_out / P.METADATA_FILE).read_text())['features_only'] is True


def test_cli_reports_every_bad_key_and_writes_nothing(tmp_path, fpn_checkpoint, capsys):
    _, state_dict = fpn_checkpoint
    bad = {k: v for k, v in state_dict.items() if k != 'neck.fpn_convs.2.conv.bias'}
    bad['decode_head.conv_seg.weight'] = torch.zeros(150, 7, 1, 1)
    path = tmp_path / 'bad.pth'
    torch.save({'state_dict': bad}, path)
    out = tmp_path / 'out'
    assert convert_cli.main(['--checkpoint', str(path), '--output', str(out)]) == 2
    err = capsys.readouterr().err
    assert 'neck.fpn_convs.2.conv.bias  expected (256)' in err
    assert 'decode_head.conv_seg.weight  expected (150, 128, 1, 1), found (150, 7, 1, 1)' in err
    assert not out.exists()


@pytest.mark.slow
def test_cli_verify_on_a_full_size_segmentation_checkpoint(tmp_path, fpn_checkpoint):
    path, _ = fpn_checkpoint
    out = tmp_path / 'verified'
    result = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            '--checkpoint',
            str(path),
            '--output',
            str(out),
            '--verify',
            '--image-size',
            '384x640',
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr
    assert 'verification passed' in result.stdout
    assert out.is_dir()
