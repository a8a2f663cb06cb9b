"""Tests of the Flax -> PyTorch export (export_torch_weights.py): original layouts, derived v1
buffers, exact round trips, and safe writing of the output file."""

import os

import numpy as np
import pytest
import torch

from crossformer_jax.cli import export as export_cli
from crossformer_jax.models import create_model
from crossformer_jax.reference.crossformer import create_torch_model, randomize_parameters
from crossformer_jax.weights import convert, export, torch_io
from crossformer_jax.weights import pretrained as P

# Reduced variants: every v1 block kind (SDA, LDA, the small-map stage 3) and a ++ ACL block.
SMALL_V1 = ('crossformer_tiny', dict(embed_dim=32, depths=(1, 2, 2, 1)))
SMALL_PP = ('crossformer_pp_small', dict(embed_dim=32, depths=(1, 1, 4, 1)))


def reference_model(name, overrides, *, num_classes=10, features_only=False, seed=0):
    model = create_torch_model(
        name, num_classes=num_classes, features_only=features_only, **overrides
    )
    return randomize_parameters(model, seed)


def flax_pair(name, overrides, state_dict, *, num_classes=10, features_only=False):
    variables = convert.convert_torch_state_dict(
        state_dict, name, num_classes=num_classes, features_only=features_only, **overrides
    )
    model = create_model(name, num_classes=num_classes, features_only=features_only, **overrides)
    return model, variables


def assert_bitwise_equal(exported, expected):
    assert sorted(exported) == sorted(expected)
    for key, value in expected.items():
        got = exported[key]
        assert got.dtype == value.dtype, key
        assert got.shape == value.shape, key
        assert torch.equal(got, value), key


@pytest.mark.parametrize('variant', [SMALL_V1, SMALL_PP], ids=['v1', 'pp'])
def test_classifier_round_trip_is_exact_and_loads_strictly(variant, tmp_path):
    name, overrides = variant
    reference = reference_model(name, overrides)
    state_dict = reference.state_dict()
    model, variables = flax_pair(name, overrides, state_dict)

    output = export.save_torch_checkpoint(
        export.torch_checkpoint(model, variables, backbone=False),
        str(tmp_path / 'model.pth'),
        overwrite=False,
    )
    checkpoint = torch.load(output, weights_only=True)
    assert list(checkpoint) == ['model']
    # Every parameter and (v1) every derived buffer, bitwise as the reference holds them.
    assert_bitwise_equal(checkpoint['model'], state_dict)
    if name == 'crossformer_tiny':
        assert any(key.endswith('.attn.relative_position_index') for key in checkpoint['model'])
    fresh = create_torch_model(name, num_classes=10, **overrides)
    fresh.load_state_dict(checkpoint['model'], strict=True)

    # And back to Flax: the same float32 parameters, bit for bit.
    again = convert.convert_torch_state_dict(checkpoint['model'], name, **overrides)
    flat_before = convert.flax_to_torch_state_dict(variables)
    flat_after = convert.flax_to_torch_state_dict(again)
    assert sorted(flat_before) == sorted(flat_after)
    for key in flat_before:
        np.testing.assert_array_equal(flat_after[key], flat_before[key], err_msg=key)


def test_v1_buffers_follow_the_group_of_each_block_at_224():
    name, overrides = 'crossformer_tiny', dict(group_size=(4, 4, 4, 4), interval=(2, 1, 1, 1))
    model = create_model(name, **overrides)
    reference = create_torch_model(name, **overrides)
    buffers = export.v1_derived_buffers(model)
    expected = {k: v for k, v in reference.state_dict().items() if convert.is_derived_buffer(k)}
    assert sorted(buffers) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(torch.from_numpy(buffers[key]), value), key
    # LDA with interval 1 on stage 2's 14x14 grid: one 14x14 group, 27*27 offsets; SDA: 4x4.
    assert buffers['layers.2.blocks.1.attn.biases'].shape == (27 * 27, 2)
    assert buffers['layers.2.blocks.0.attn.relative_position_index'].shape == (16, 16)


@pytest.mark.parametrize('variant', [SMALL_V1, SMALL_PP], ids=['v1', 'pp'])
def test_backbone_layout_round_trip(variant, tmp_path):
    name, overrides = variant
    reference = reference_model(name, overrides, features_only=True, seed=1)
    state_dict = reference.state_dict()
    model, variables = flax_pair(name, overrides, state_dict, features_only=True)
    output = export.save_torch_checkpoint(
        export.torch_checkpoint(model, variables, backbone=False),
        str(tmp_path / 'backbone.pth'),
        overwrite=False,
    )
    checkpoint = torch.load(output, weights_only=True)
    assert list(checkpoint) == ['state_dict']
    learned = {k: v for k, v in state_dict.items() if not convert.is_derived_buffer(k)}
    assert_bitwise_equal(
        checkpoint['state_dict'], {export.BACKBONE_PREFIX + k: v for k, v in learned.items()}
    )
    # The converter reads the detection/segmentation layout back to the same parameters.
    back, _ = torch_io.extract_state_dict(checkpoint)
    again = convert.convert_torch_state_dict(back, name, **overrides)
    for key, value in convert.flax_to_torch_state_dict(again).items():
        np.testing.assert_array_equal(value, learned[key].numpy(), err_msg=key)


def test_classifier_exported_as_backbone_drops_norm_and_head():
    name, overrides = SMALL_PP
    model, variables = flax_pair(name, overrides, reference_model(name, overrides).state_dict())
    checkpoint = export.torch_checkpoint(model, variables, backbone=True)
    keys = list(checkpoint['state_dict'])
    assert all(k.startswith('backbone.') for k in keys)
    assert not [k for k in keys if k.startswith(('backbone.norm.', 'backbone.head.'))]
    assert 'backbone.patch_embed.norm.weight' in keys


@pytest.fixture(scope='module')
def pretrained_dir(tmp_path_factory):
    name, overrides = SMALL_V1
    _model, variables = flax_pair(
        name, overrides, reference_model(name, overrides, seed=2).state_dict()
    )
    directory = str(tmp_path_factory.mktemp('export') / 'weights')
    P.save_pretrained(
        directory,
        variables,
        model_name=name,
        num_classes=10,
        features_only=False,
        model_overrides=overrides,
    )
    return directory, variables


def test_cli_writes_loadable_file_and_refuses_to_overwrite(pretrained_dir, tmp_path, capsys):
    directory, variables = pretrained_dir
    name, overrides = SMALL_V1
    output = str(tmp_path / 'out.pth')
    assert export_cli.main(['--weights', directory, '--output', output]) == 0
    assert "{'model': " in capsys.readouterr().out
    checkpoint = torch.load(output, weights_only=True)
    torch_model = create_torch_model(name, num_classes=10, **overrides)
    torch_model.load_state_dict(checkpoint['model'], strict=True)
    for key, value in convert.flax_to_torch_state_dict(variables).items():
        np.testing.assert_array_equal(checkpoint['model'][key].numpy(), value, err_msg=key)

    before = open(output, 'rb').read()
    assert export_cli.main(['--weights', directory, '--output', output, '--backbone']) == 2
    assert 'already exists; pass --overwrite' in capsys.readouterr().err
    assert open(output, 'rb').read() == before

    assert (
        export_cli.main(['--weights', directory, '--output', output, '--backbone', '--overwrite'])
        == 0
    )
    assert list(torch.load(output, weights_only=True)) == ['state_dict']
    assert sorted(os.listdir(tmp_path)) == ['out.pth']  # no temporary file left behind


def test_cli_error_leaves_existing_file_untouched(tmp_path, capsys):
    output = tmp_path / 'keep.pth'
    output.write_bytes(b'precious')
    code = export_cli.main(
        ['--weights', str(tmp_path / 'missing'), '--output', str(output), '--overwrite']
    )
    assert code == 2
    assert 'no weights at' in capsys.readouterr().err
    assert output.read_bytes() == b'precious'
    assert sorted(os.listdir(tmp_path)) == ['keep.pth']

    assert export_cli.main(['--weights', str(tmp_path), '--output', str(tmp_path)]) == 2
    assert 'is a directory' in capsys.readouterr().err


@pytest.mark.parametrize('name', ['upernet_crossformer_small', 'fpn_crossformer_pp_small'])
def test_segmentation_model_round_trip_in_the_mmsegmentation_layout(name, tmp_path):
    from crossformer_jax.reference.segmentation import (
        create_torch_segmentation_model,
        randomize_batch_norm_statistics,
    )

    overrides = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), head_channels=32)
    reference = create_torch_segmentation_model(name, num_classes=5, **overrides)
    randomize_batch_norm_statistics(randomize_parameters(reference, 3), 4)
    state_dict = reference.state_dict()
    variables = convert.convert_torch_state_dict(state_dict, name, num_classes=5, **overrides)
    model = create_model(name, num_classes=5, **overrides)
    output = export.save_torch_checkpoint(
        export.torch_checkpoint(model, variables, backbone=False),
        str(tmp_path / 'segmentation.pth'),
        overwrite=False,
    )
    checkpoint = torch.load(output, weights_only=True)
    assert list(checkpoint) == ['state_dict']
    # The reference's v1 backbone also registers the derived buffers, which MMSegmentation
    # checkpoints do not hold: everything else, BatchNorm statistics included, bit for bit.
    attention_buffers = ('.attn.biases', '.attn.relative_position_index')
    learned = {k: v for k, v in state_dict.items() if not k.endswith(attention_buffers)}
    assert any(k.endswith('.num_batches_tracked') for k in learned)
    assert_bitwise_equal(checkpoint['state_dict'], learned)
    missing, unexpected = create_torch_segmentation_model(
        name, num_classes=5, **overrides
    ).load_state_dict(checkpoint['state_dict'], strict=False)
    assert not unexpected and all(k.endswith(attention_buffers) for k in missing)

    backbone = export.torch_checkpoint(model, variables, backbone=True)['state_dict']
    assert sorted(backbone) == sorted(k for k in learned if k.startswith('backbone.'))
