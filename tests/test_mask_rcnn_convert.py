"""Conversion of MMDetection checkpoints of (Cascade) Mask R-CNN on CrossFormer, verification
against the PyTorch reference (RPN, box and mask head outputs on the same RoIs), and export back."""

import json

import jax
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict, unflatten_dict

from crossformer_jax.cli import convert as convert_cli
from crossformer_jax.cli import export as export_cli
from crossformer_jax.models import create_model
from crossformer_jax.models.mask_rcnn import MASK_RCNN_VARIANTS, MaskRCNN
from crossformer_jax.reference.mask_rcnn import (
    create_torch_mask_rcnn_model,
    randomize_mask_rcnn_parameters,
)
from crossformer_jax.reference.segmentation import randomize_batch_norm_statistics
from crossformer_jax.weights import convert as C
from crossformer_jax.weights import export as E
from crossformer_jax.weights import pretrained as P
from crossformer_jax.weights import torch_io
from crossformer_jax.weights import verify as V
from crossformer_jax.weights.loading import load_weights

MASK_RCNN = 'mask_rcnn_crossformer_small'
CASCADE = 'cascade_mask_rcnn_crossformer_small'
TINY = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))
# Narrow heads, each model with layer counts other than its released ones.
NARROW = {
    MASK_RCNN: dict(
        fpn_channels=16, rpn_channels=8, box_fc_channels=32, mask_channels=8, num_mask_convs=2
    ),
    CASCADE: dict(
        fpn_channels=16,
        rpn_channels=8,
        box_conv_channels=8,
        box_fc_channels=32,
        mask_channels=8,
        num_box_convs=2,
        num_mask_convs=1,
    ),
}
CLASSES = ('cat', 'dog', 'bird')
ATTENTION_BUFFERS = ('.attn.biases', '.attn.relative_position_index')


def random_state_dict(name, seed=0, num_classes=3, **overrides):
    """The reference's state dict with every parameter and BatchNorm statistic redrawn, without
    the derived attention buffers (which MMDetection checkpoints do not hold)."""
    model = create_torch_mask_rcnn_model(name, num_classes, **overrides)
    randomize_batch_norm_statistics(randomize_mask_rcnn_parameters(model, seed), seed + 1)
    return {k: v for k, v in model.state_dict().items() if not k.endswith(ATTENTION_BUFFERS)}


def num_parameters(state_dict) -> int:
    return sum(
        v.numel()
        for k, v in state_dict.items()
        if not C.is_derived_buffer(k) and not k.endswith(('.running_mean', '.running_var'))
    )


def tiny_conversion(name, directory):
    """A reduced model (embed_dim 16, one block per stage, narrow heads, 3 classes) with random
    weights, saved as MMDetection 2.x saves a model, read back and converted: (name, state dict,
    variables, report)."""
    state_dict = random_state_dict(name, **TINY, **NARROW[name])
    path = directory / f'{name}.pth'
    torch.save(
        {'meta': {'CLASSES': CLASSES, 'mmdet_version': '2.11.0'}, 'state_dict': state_dict}, path
    )
    checkpoint = torch_io.read_torch_checkpoint(path)
    loaded, skipped = torch_io.extract_state_dict(checkpoint, keep_heads=True)
    assert skipped == [] and torch_io.checkpoint_class_names(checkpoint) == list(CLASSES)
    variables, report = C.convert_with_report(loaded, name, **TINY)
    return name, loaded, variables, report


@pytest.fixture(scope='module')
def tiny_mask_rcnn(tmp_path_factory):
    return tiny_conversion(MASK_RCNN, tmp_path_factory.mktemp('mmdet'))


@pytest.fixture(scope='module')
def tiny_cascade(tmp_path_factory):
    return tiny_conversion(CASCADE, tmp_path_factory.mktemp('mmdet'))


BOTH = pytest.mark.parametrize('fixture', ['tiny_mask_rcnn', 'tiny_cascade'])


def head_labels(cascade: bool) -> list[str]:
    labels = [f'level {i} {what}' for what in ('objectness', 'rpn deltas') for i in range(5)]
    for suffix in ('.0', '.1', '.2') if cascade else ('',):
        labels += [
            f'roi_head.bbox_head{suffix} class logits',
            f'roi_head.bbox_head{suffix} box deltas',
            f'roi_head.mask_head{suffix} mask logits',
        ]
    return labels


@BOTH
def test_conversion_reads_the_widths_and_verifies_at_two_sizes(fixture, request):
    name, state_dict, variables, report = request.getfixturevalue(fixture)
    cascade = name == CASCADE
    assert report.model_name == name and report.num_classes == 3 and not report.features_only
    assert report.overrides == {**NARROW[name], **TINY}
    assert C.detection_overrides(state_dict, name) == NARROW[name]
    assert report.num_params == num_parameters(state_dict)
    assert set(variables) == ({'params', 'batch_stats'} if cascade else {'params'})
    if cascade:
        assert report.skipped_buffers == [
            f'roi_head.bbox_head.{s}.shared_convs.{i}.bn.num_batches_tracked'
            for s in range(3)
            for i in range(2)
        ]
    stage = '_0' if cascade else ''
    box, mask = (
        variables['params']['roi_head'][f'{head}{stage}'] for head in ('bbox_head', 'mask_head')
    )
    torch_box, torch_mask = (
        f'roi_head.{head}{stage.replace("_", ".")}' for head in ('bbox_head', 'mask_head')
    )
    np.testing.assert_array_equal(
        box['shared_fcs_0']['kernel'], state_dict[f'{torch_box}.shared_fcs.0.weight'].numpy().T
    )
    np.testing.assert_array_equal(
        mask['upsample']['kernel'],
        state_dict[f'{torch_mask}.upsample.weight'].numpy().transpose(2, 3, 1, 0),
    )
    for size in [(64, 96), (128, 128)]:
        comparisons = V.compare_with_torch(
            state_dict,
            variables,
            name,
            num_classes=3,
            features_only=False,
            image_size=size,
            batch_size=2,
            **report.overrides,
        )
        assert [c.label for c in comparisons] == head_labels(cascade)
        heads = comparisons[10:]
        assert [c.shape for c in heads[:3]] == [(32, 4), (32, 12), (32, 3, 28, 28)]
        assert all(c.passes(V.DETECTION_TOLERANCE) for c in comparisons), comparisons
        # Measured: at most 3e-6 (float32 rounding of the two implementations).
        assert max(c.relative for c in comparisons) < 5e-6
        assert min(c.max_abs_reference for c in comparisons) > 0.1


def planted(variables, collection, path, change):
    """variables with the leaf at `path` of `collection` replaced by change(leaf)."""
    flat = flatten_dict(variables[collection])
    flat[path] = change(np.asarray(flat[path]))
    return {**variables, collection: unflatten_dict(flat)}


def test_planted_errors_fail_the_verification(tiny_cascade):
    """Planted in the cascade model, which has every kind of layer."""
    name, state_dict, variables, report = tiny_cascade

    def failing(variables):
        comparisons = V.compare_with_torch(
            state_dict,
            variables,
            name,
            num_classes=3,
            features_only=False,
            image_size=(64, 64),
            **report.overrides,
        )
        return [c.label for c in comparisons if not c.passes(V.DETECTION_TOLERANCE)]

    # The RoI features flattened channels-last, (7, 7, C), instead of PyTorch's (C, 7, 7).
    channels = NARROW[CASCADE]['box_conv_channels']

    def hwc_order(kernel):
        return kernel.reshape(channels, 7, 7, -1).transpose(1, 2, 0, 3).reshape(kernel.shape)

    def flipped(kernel):
        return kernel[::-1, ::-1]

    def scaled(value):
        return value * 1.001

    assert failing(
        planted(
            variables, 'params', ('roi_head', 'bbox_head_0', 'shared_fcs_0', 'kernel'), hwc_order
        )
    ) == ['roi_head.bbox_head.0 class logits', 'roi_head.bbox_head.0 box deltas']
    # The transposed convolution's kernel flipped in space (the conv-gradient convention).
    assert failing(
        planted(variables, 'params', ('roi_head', 'mask_head_2', 'upsample', 'kernel'), flipped)
    ) == ['roi_head.mask_head.2 mask logits']
    # A running variance 0.1 % off in the middle stage's second BatchNorm.
    path = ('roi_head', 'bbox_head_1', 'shared_convs_1', 'bn', 'var')
    assert failing(planted(variables, 'batch_stats', path, scaled)) == [
        'roi_head.bbox_head.1 class logits',
        'roi_head.bbox_head.1 box deltas',
    ]
    # The RPN's objectness bias 0.1 % off: every level, nothing else.
    path = ('rpn_head', 'rpn_cls', 'bias')
    assert failing(planted(variables, 'params', path, scaled)) == [
        f'level {i} objectness' for i in range(5)
    ]


@pytest.mark.parametrize('name', sorted(MASK_RCNN_VARIANTS))
def test_reference_state_dicts_of_every_model_match_the_flax_models(name):
    with torch.device('meta'):
        model = create_torch_mask_rcnn_model(name)
        state_dict = model.state_dict()
    assert torch_io.is_detection_state_dict(state_dict)
    assert not torch_io.is_segmentation_state_dict(state_dict)
    assert C.infer_model_name(state_dict) == name
    assert C.infer_model_name({f'module.{k}': v for k, v in state_dict.items()}) == name
    report = C.check_torch_state_dict(state_dict, name)
    assert report.num_classes == 80 and report.overrides == {} and not report.features_only
    assert report.num_params == sum(p.numel() for p in model.parameters())
    assert report.num_params == num_parameters(state_dict)
    checkpoint = {'state_dict': state_dict, 'meta': {}}
    whole, skipped = torch_io.extract_state_dict(checkpoint, keep_heads=True)
    assert whole.keys() == state_dict.keys() and skipped == []
    # Without keep_heads (--model <backbone>): the backbone alone.
    backbone, skipped = torch_io.extract_state_dict(checkpoint)
    assert skipped and all(k.startswith(('neck.', 'rpn_head.', 'roi_head.')) for k in skipped)
    backbone_name = MASK_RCNN_VARIANTS[name]['backbone']
    assert C.check_torch_state_dict(backbone, backbone_name).features_only


def test_name_inference_errors():
    with torch.device('meta'):
        tiny = create_torch_mask_rcnn_model(MASK_RCNN, **TINY).state_dict()
        on_base = create_torch_mask_rcnn_model(
            CASCADE, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)
        ).state_dict()
    with pytest.raises(C.ModelNameError, match='no registered CrossFormer variant matches'):
        C.infer_model_name(tiny)
    with pytest.raises(C.ModelNameError, match='cascade_mask_rcnn_crossformer_base, which is not'):
        C.infer_model_name(on_base)
    rpn_only = {k: v for k, v in on_base.items() if not k.startswith('roi_head.')}
    with pytest.raises(C.ModelNameError, match=r"or 'rpn_head.\*' with 'roi_head.\*' keys"):
        C.infer_model_name(rpn_only)


def test_mismatches_are_all_listed(tiny_mask_rcnn):
    name, state_dict, _, _ = tiny_mask_rcnn
    bad = dict(state_dict)
    del bad['roi_head.mask_head.upsample.bias']
    bad['roi_head.bbox_head.shared_fcs.0.weight'] = torch.zeros(32, 7 * 7 * 8)
    bad['roi_head.bbox_head.0.fc_cls.weight'] = torch.zeros(4, 32)
    with pytest.raises(C.StateDictMismatchError) as info:
        C.convert_torch_state_dict(bad, name, **TINY)
    err = info.value
    assert err.missing == ['roi_head.mask_head.upsample.bias']
    assert err.unexpected == ['roi_head.bbox_head.0.fc_cls.weight']
    # shared_fcs.0 reads 7 x 7 RoI features of the FPN's 16 channels.
    assert err.mismatched == {
        'roi_head.bbox_head.shared_fcs.0.weight': ((32, 7 * 7 * 16), (32, 7 * 7 * 8))
    }
    assert 'mask_rcnn_crossformer_small detection model with 3 classes' in str(err)
    assert 'roi_head.mask_head.upsample.bias  expected (8)' in str(err)

    background_only = {**state_dict, 'roi_head.bbox_head.fc_cls.weight': torch.zeros(1, 32)}
    with pytest.raises(ValueError, match=r'fc_cls.weight has 1 outputs; expected classes \+ 1'):
        C.convert_torch_state_dict(background_only, name, **TINY)
    with pytest.raises(ValueError, match='detection model; features_only does not apply'):
        C.convert_torch_state_dict(state_dict, name, features_only=True, **TINY)


def assert_bitwise_equal(found, expected):
    assert sorted(found) == sorted(expected)
    for key, value in expected.items():
        assert found[key].dtype == value.dtype and torch.equal(found[key], value), key


@BOTH
def test_export_round_trip_is_bitwise_and_loads_strictly(fixture, request, tmp_path):
    name, state_dict, variables, report = request.getfixturevalue(fixture)
    model = create_model(name, 3, **report.overrides)
    assert isinstance(model, MaskRCNN)
    meta = E.detection_meta(name, CLASSES)
    output = E.save_torch_checkpoint(
        E.torch_checkpoint(model, variables, backbone=False, meta=meta),
        str(tmp_path / 'mask_rcnn.pth'),
        overwrite=False,
    )
    checkpoint = torch.load(output, weights_only=True)
    assert sorted(checkpoint) == ['meta', 'state_dict']
    assert checkpoint['meta']['CLASSES'] == CLASSES and checkpoint['meta']['model_name'] == name
    # BatchNorm statistics and step counters (0, int64) included, bit for bit.
    assert (name == CASCADE) == any(k.endswith('.num_batches_tracked') for k in state_dict)
    assert_bitwise_equal(checkpoint['state_dict'], state_dict)
    reference = create_torch_mask_rcnn_model(name, 3, **report.overrides)
    missing, unexpected = reference.load_state_dict(checkpoint['state_dict'], strict=False)
    assert unexpected == [] and all(k.endswith(ATTENTION_BUFFERS) for k in missing)
    again = C.convert_torch_state_dict(checkpoint['state_dict'], name, **TINY)
    flat, flat_again = flatten_dict(variables), flatten_dict(again)
    assert flat.keys() == flat_again.keys()
    for key, value in flat.items():
        np.testing.assert_array_equal(flat_again[key], value, err_msg=str(key))

    backbone = E.torch_checkpoint(model, variables, backbone=True)
    assert list(backbone) == ['state_dict']
    assert sorted(backbone['state_dict']) == sorted(
        k for k in state_dict if k.startswith('backbone.')
    )


@pytest.fixture(scope='module')
def small_cascade_checkpoint(tmp_path_factory):
    """cascade_mask_rcnn_crossformer_small's full backbone (so that its name is inferred) with
    narrow heads, random weights and BatchNorm statistics, 3 classes named in the meta."""
    state_dict = random_state_dict(CASCADE, seed=2, **NARROW[CASCADE])
    path = tmp_path_factory.mktemp('mmdet_small') / 'cascade_small.pth'
    torch.save({'state_dict': state_dict, 'meta': {'CLASSES': CLASSES}}, path)
    return path, state_dict


def test_cli_converts_verifies_loads_and_exports(tmp_path, small_cascade_checkpoint, capsys):
    path, state_dict = small_cascade_checkpoint
    out = tmp_path / 'cascade'
    convert = ['--checkpoint', str(path), '--output', str(out)]
    assert convert_cli.main([*convert, '--verify', '--image-size', '64x96']) == 0
    printed = capsys.readouterr().out
    assert f'inferred model: {CASCADE}' in printed
    assert f'model: {CASCADE} (detection, 3 classes, head widths {NARROW[CASCADE]})' in printed
    assert 'skipped keys: 6' in printed  # the num_batches_tracked of 2 BatchNorms x 3 stages
    assert 'class names: 3 from the checkpoint meta (CLASSES)' in printed
    lines = [line for line in printed.splitlines() if 'max|diff|' in line]
    assert len(lines) == len(head_labels(cascade=True))
    assert all(' ok (tolerance 1e-05)' in line for line in lines)
    assert 'roi_head.mask_head.2 mask logits (16, 3, 28, 28)' in printed
    assert 'verification passed' in printed

    metadata = json.loads((out / P.METADATA_FILE).read_text())
    assert metadata['model_name'] == CASCADE and metadata['num_classes'] == 3
    assert metadata['model_overrides'] == NARROW[CASCADE]
    assert metadata['label_names'] == list(CLASSES)
    weights = load_weights(out)
    assert weights.task == 'instance_segmentation' and isinstance(weights.model, MaskRCNN)
    assert weights.preprocessing.input_size == P.DETECTION_INPUT_SIZE
    assert set(weights.variables) == {'params', 'batch_stats'}
    images = jax.ShapeDtypeStruct((1, 64, 96, 3), np.float32)
    outputs = jax.eval_shape(weights.model.apply, weights.variables, images)
    assert outputs['mask_logits'][2].shape == (1, 1, 28, 28, 3)

    exported = tmp_path / 'exported.pth'
    assert export_cli.main(['--weights', str(out), '--output', str(exported)]) == 0
    assert "'meta'}" in capsys.readouterr().out
    checkpoint = torch.load(exported, weights_only=True)
    assert checkpoint['meta']['CLASSES'] == CLASSES and checkpoint['meta']['model_name'] == CASCADE
    assert_bitwise_equal(checkpoint['state_dict'], state_dict)


def test_cli_reports_every_bad_key_and_writes_nothing(tmp_path, small_cascade_checkpoint, capsys):
    _, state_dict = small_cascade_checkpoint
    bad = {k: v for k, v in state_dict.items() if k != 'roi_head.bbox_head.1.fc_reg.bias'}
    bad['roi_head.mask_head.2.upsample.weight'] = torch.zeros(8, 16, 2, 2)
    path = tmp_path / 'bad.pth'
    torch.save({'state_dict': bad}, path)
    out = tmp_path / 'out'
    assert convert_cli.main(['--checkpoint', str(path), '--output', str(out)]) == 2
    err = capsys.readouterr().err
    assert 'roi_head.bbox_head.1.fc_reg.bias  expected (12)' in err
    assert 'roi_head.mask_head.2.upsample.weight  expected (8, 8, 2, 2), found (8, 16, 2, 2)' in err
    assert not out.exists()
