"""Conversion of MMDetection checkpoints (RetinaNet on CrossFormer), verification against the
PyTorch reference (outputs and detections), and export back."""

import json
import os

import jax
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict

from crossformer_jax.cli import convert as convert_cli
from crossformer_jax.cli import export as export_cli
from crossformer_jax.detection.anchors import AnchorGenerator
from crossformer_jax.models import create_model
from crossformer_jax.models.detection import DETECTION_VARIANTS, RetinaNet
from crossformer_jax.reference.crossformer import randomize_parameters
from crossformer_jax.reference.detection import create_torch_detection_model
from crossformer_jax.weights import convert as C
from crossformer_jax.weights import export as E
from crossformer_jax.weights import pretrained as P
from crossformer_jax.weights import torch_io
from crossformer_jax.weights import verify as V
from crossformer_jax.weights.loading import load_weights

NAME = 'retinanet_crossformer_small'
TINY = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))
NARROW = dict(fpn_channels=24, head_channels=16, num_head_convs=2)
CLASSES = ('cat', 'dog', 'bird')


def random_state_dict(name, seed=0, num_classes=3, **overrides):
    model = create_torch_detection_model(name, num_classes, **overrides)
    return randomize_parameters(model, seed).state_dict()


def without_derived_buffers(state_dict):
    return {k: v for k, v in state_dict.items() if not C.is_derived_buffer(k)}


@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
    """A reduced RetinaNet (embed_dim 16, one block per stage, narrow neck and head, 3 classes)
    with random weights, saved as MMDetection 2.x saves a model."""
    state_dict = random_state_dict(NAME, **TINY, **NARROW)
    path = tmp_path_factory.mktemp('mmdet') / 'retinanet_tiny.pth'
    meta = {'CLASSES': CLASSES, 'mmdet_version': '2.11.0', 'epoch': 12}
    torch.save({'meta': meta, 'state_dict': state_dict}, path)
    return path, state_dict


@pytest.fixture(scope='module')
def tiny_conversion(tiny_checkpoint):
    path, _ = tiny_checkpoint
    checkpoint = torch_io.read_torch_checkpoint(path)
    state_dict, skipped = torch_io.extract_state_dict(checkpoint, keep_heads=True)
    assert skipped == [] and torch_io.checkpoint_class_names(checkpoint) == list(CLASSES)
    variables, report = C.convert_with_report(state_dict, NAME, **TINY)
    return state_dict, variables, report


def test_conversion_reads_the_widths_and_verifies_at_two_sizes(tiny_conversion):
    state_dict, variables, report = tiny_conversion
    assert report.model_name == NAME and report.num_classes == 3 and not report.features_only
    assert report.overrides == {**NARROW, **TINY}
    assert C.detection_overrides(state_dict, NAME) == NARROW
    assert report.num_params == sum(v.numel() for v in without_derived_buffers(state_dict).values())
    assert set(variables) == {'params'}
    np.testing.assert_array_equal(
        variables['params']['bbox_head']['retina_cls']['kernel'],
        state_dict['bbox_head.retina_cls.weight'].numpy().transpose(2, 3, 1, 0),
    )
    for size in [(64, 96), (128, 128)]:
        comparisons = V.compare_with_torch(
            state_dict,
            variables,
            NAME,
            num_classes=3,
            features_only=False,
            image_size=size,
            batch_size=2,
            **report.overrides,
        )
        labels = [c.label for c in comparisons]
        assert labels[:10] == [
            f'level {level} {what}' for what in ('class logits', 'box deltas') for level in range(5)
        ]
        assert labels[10].startswith('detections (class logits shifted by ')
        assert labels[10].endswith(': boxes') and labels[11].endswith(': scores')
        assert all(c.passes(V.DETECTION_TOLERANCE) for c in comparisons), comparisons
        assert max(c.relative for c in comparisons[:10]) < V.DETECTION_TOLERANCE
        assert comparisons[10].tolerance == V.DETECTIONS_TOLERANCE
        # The shift puts ~300 pairs per image above the threshold: NMS leaves up to 100 each.
        assert 100 <= comparisons[10].shape[0] <= 200


def test_planted_errors_fail_the_verification(tiny_conversion):
    state_dict, variables, report = tiny_conversion

    def compare(path, change):
        flat = flatten_dict(variables['params'])
        flat[path] = change(flat[path])
        planted = {'params': {}}
        for key, value in flat.items():
            node = planted['params']
            for part in key[:-1]:
                node = node.setdefault(part, {})
            node[key[-1]] = value
        comparisons = V.compare_with_torch(
            state_dict,
            planted,
            NAME,
            num_classes=3,
            features_only=False,
            image_size=(64, 64),
            **report.overrides,
        )
        # 'level 0 class logits', ..., then the detections: 'boxes' and 'scores', or one that
        # says how they differ (in number or classes).
        return {
            c.label if c.label.startswith('level') else c.label.split(': ')[-1]: c
            for c in comparisons
        }

    # A kernel transposed (in and out channels swapped) in the classification tower.
    transposed = compare(
        ('bbox_head', 'cls_convs_1', 'conv', 'kernel'), lambda k: k.transpose(0, 1, 3, 2)
    )
    assert all(not transposed[f'level {i} class logits'].passes(1e-5) for i in range(5))
    assert all(transposed[f'level {i} box deltas'].passes(1e-5) for i in range(5))
    (detections,) = set(transposed) - {
        f'level {i} {what}' for i in range(5) for what in ('class logits', 'box deltas')
    }
    assert transposed[detections].mismatch is not None and not transposed[detections].passes(1)
    # A bias 0.1 % off in the box regressor: every level's deltas fail, the scores do not.
    scaled = compare(('bbox_head', 'retina_reg', 'bias'), lambda b: b * 1.001)
    assert all(not scaled[f'level {i} box deltas'].passes(1e-5) for i in range(5))
    assert all(scaled[f'level {i} class logits'].passes(1e-5) for i in range(5))
    assert not scaled['boxes'].passes(1e-5) and scaled['scores'].passes(1e-5)


def test_compare_detections_catches_different_boxes_and_classes():
    generator = AnchorGenerator()
    rng = np.random.default_rng(0)
    sizes = generator.feature_sizes(64, 64)
    reference = (
        [rng.standard_normal((1, 9 * 3, h, w)).astype(np.float32) for h, w in sizes],
        [0.2 * rng.standard_normal((1, 9 * 4, h, w)).astype(np.float32) for h, w in sizes],
    )
    same = V.compare_detections(reference, reference, generator, (64, 64))
    assert [c.label.split(': ')[-1] for c in same] == ['boxes', 'scores']
    # The same outputs: PyTorch's and JAX's rounding (sigmoid, exp) alone tell them apart.
    assert all(c.passes(1.0) and c.relative < 1e-6 for c in same)
    assert same[0].shape[0] > 10

    moved = (reference[0], [x + np.float32(1e-3) for x in reference[1]])
    boxes, scores = V.compare_detections(reference, moved, generator, (64, 64))
    assert not boxes.passes(1.0) and 1e-4 < boxes.relative < 1e-2
    assert scores.passes(1.0) and scores.relative < 1e-6

    # Classes 0 and 1 swapped in every anchor's logits.
    swapped = [
        x.reshape(1, 9, 3, *x.shape[2:])[:, :, [1, 0, 2]].reshape(x.shape) for x in reference[0]
    ]
    (mismatch,) = V.compare_detections(reference, (swapped, reference[1]), generator, (64, 64))
    assert mismatch.mismatch == 'image 0: the classes of the detections differ'
    assert not mismatch.passes(1.0)


@pytest.mark.parametrize('name', sorted(DETECTION_VARIANTS))
def test_reference_state_dicts_of_every_model_match_the_flax_models(name):
    with torch.device('meta'):
        state_dict = create_torch_detection_model(name).state_dict()
    assert C.infer_model_name(state_dict) == name
    assert C.infer_model_name({f'module.{k}': v for k, v in state_dict.items()}) == name
    report = C.check_torch_state_dict(state_dict, name)
    assert report.num_classes == 80 and report.overrides == {} and not report.features_only
    assert report.num_params == sum(v.numel() for v in without_derived_buffers(state_dict).values())
    checkpoint = {'state_dict': state_dict, 'meta': {}}
    whole, skipped = torch_io.extract_state_dict(checkpoint, keep_heads=True)
    assert whole.keys() == state_dict.keys() and skipped == []
    # Without keep_heads (--model <backbone>): the backbone alone.
    backbone, skipped = torch_io.extract_state_dict(checkpoint)
    assert skipped and all(k.startswith(('neck.', 'bbox_head.')) for k in skipped)
    assert C.check_torch_state_dict(backbone, name[len('retinanet_') :]).features_only


def test_name_inference_errors(tiny_checkpoint):
    _, state_dict = tiny_checkpoint
    with pytest.raises(C.ModelNameError, match='no registered CrossFormer variant matches'):
        C.infer_model_name(state_dict)  # embed_dim 16: no registered backbone
    with torch.device('meta'):
        tiny_backbone = dict(embed_dim=64, depths=(1, 1, 8, 6), num_heads=(2, 4, 8, 16))
        on_tiny = create_torch_detection_model(NAME, **tiny_backbone).state_dict()
    with pytest.raises(C.ModelNameError, match='retinanet_crossformer_tiny, which is not a regis'):
        C.infer_model_name(on_tiny)
    other_head = {k: v for k, v in on_tiny.items() if not k.startswith('bbox_head.retina_')}
    with pytest.raises(C.ModelNameError, match="expected 'bbox_head.retina_cls.weight'"):
        C.infer_model_name(other_head)
    headless = {k: v for k, v in on_tiny.items() if not k.startswith('backbone.')}
    with pytest.raises(C.ModelNameError, match='the detection state dict has no backbone'):
        C.infer_model_name(headless)


def test_mismatches_are_all_listed(tiny_checkpoint):
    _, state_dict = tiny_checkpoint
    bad = dict(state_dict)
    del bad['bbox_head.reg_convs.1.conv.bias']
    bad['neck.fpn_convs.3.conv.weight'] = torch.zeros(24, 24, 3, 3)
    bad['bbox_head.extra.weight'] = torch.zeros(3)
    with pytest.raises(C.StateDictMismatchError) as info:
        C.convert_torch_state_dict(bad, NAME, **TINY)
    err = info.value
    assert err.missing == ['bbox_head.reg_convs.1.conv.bias']
    assert err.unexpected == ['bbox_head.extra.weight']
    # fpn_convs.3 reads the last backbone map (8 * 16 channels), not the FPN's 24.
    assert err.mismatched == {'neck.fpn_convs.3.conv.weight': ((24, 128, 3, 3), (24, 24, 3, 3))}
    assert 'retinanet_crossformer_small detection model with 3 classes' in str(err)
    assert 'bbox_head.reg_convs.1.conv.bias  expected (16)' in str(err)

    odd = dict(state_dict)
    odd['bbox_head.retina_cls.weight'] = torch.zeros(28, 16, 3, 3)
    with pytest.raises(ValueError, match='28 output channels, not a multiple of the 9 anchors'):
        C.convert_torch_state_dict(odd, NAME, **TINY)
    with pytest.raises(ValueError, match='detection model; features_only does not apply'):
        C.convert_torch_state_dict(state_dict, NAME, features_only=True, **TINY)


def test_export_round_trip_is_bitwise_and_loads_strictly(tiny_conversion, tmp_path):
    state_dict, variables, report = tiny_conversion
    model = create_model(NAME, 3, **report.overrides)
    assert isinstance(model, RetinaNet)
    meta = E.detection_meta(NAME, CLASSES)
    output = E.save_torch_checkpoint(
        E.torch_checkpoint(model, variables, backbone=False, meta=meta),
        str(tmp_path / 'retinanet.pth'),
        overwrite=False,
    )
    checkpoint = torch.load(output, weights_only=True)
    assert sorted(checkpoint) == ['meta', 'state_dict']
    assert checkpoint['meta'] == {
        'exported_by': 'crossformer_jax (export_torch_weights.py)',
        'converter_version': C.CONVERTER_VERSION,
        'model_name': NAME,
        'CLASSES': CLASSES,
    }
    expected = without_derived_buffers(state_dict)
    exported = checkpoint['state_dict']
    assert sorted(exported) == sorted(expected)
    for key, value in expected.items():
        assert exported[key].dtype == value.dtype and torch.equal(exported[key], value), key
    reference = create_torch_detection_model(NAME, 3, **report.overrides)
    missing, unexpected = reference.load_state_dict(exported, strict=False)
    assert unexpected == [] and missing and all(C.is_derived_buffer(k) for k in missing)
    again = C.convert_torch_state_dict(exported, NAME, **TINY)
    flat, flat_again = flatten_dict(variables), flatten_dict(again)
    assert flat.keys() == flat_again.keys()
    for key, value in flat.items():
        np.testing.assert_array_equal(flat_again[key], value, err_msg=str(key))

    backbone = E.torch_checkpoint(model, variables, backbone=True)
    assert list(backbone) == ['state_dict']
    assert sorted(backbone['state_dict']) == sorted(
        k for k in expected if k.startswith('backbone.')
    )


@pytest.fixture(scope='module')
def small_checkpoint(tmp_path_factory):
    """retinanet_crossformer_small's full backbone with a narrow neck and head (so that its name
    is inferred), random weights, 3 classes named in the meta (~120 MB)."""
    state_dict = random_state_dict(
        NAME, seed=1, fpn_channels=16, head_channels=16, num_head_convs=1
    )
    path = tmp_path_factory.mktemp('mmdet_small') / 'retinanet_small.pth'
    torch.save({'state_dict': state_dict, 'meta': {'CLASSES': CLASSES}}, path)
    return path, state_dict


def test_cli_converts_verifies_loads_and_exports(tmp_path, small_checkpoint, capsys):
    path, state_dict = small_checkpoint
    out = tmp_path / 'retinanet'
    convert = ['--checkpoint', str(path), '--output', str(out)]
    assert convert_cli.main([*convert, '--verify', '--image-size', '64', '64x96']) == 0
    printed = capsys.readouterr().out
    assert f'inferred model: {NAME}' in printed
    assert (
        f"model: {NAME} (detection, 3 classes, head widths {{'fpn_channels': 16, "
        "'head_channels': 16, 'num_head_convs': 1})" in printed
    )
    assert 'class names: 3 from the checkpoint meta (CLASSES)' in printed
    assert 'verifying against the PyTorch reference at 64x64 (seed 0)' in printed
    assert 'verifying against the PyTorch reference at 64x96 (seed 0)' in printed
    lines = [line for line in printed.splitlines() if 'max|diff|' in line]
    assert len(lines) == 2 * 12 and all(
        line.endswith(('(tolerance 1e-05)', '(tolerance 0.0001)')) for line in lines
    )
    assert all(' ok ' in line for line in lines)
    assert 'verification passed' in printed

    metadata = json.loads((out / P.METADATA_FILE).read_text())
    assert metadata['model_name'] == NAME and metadata['num_classes'] == 3
    assert metadata['label_names'] == list(CLASSES)
    assert metadata['model_overrides'] == {
        'fpn_channels': 16,
        'head_channels': 16,
        'num_head_convs': 1,
    }
    weights = load_weights(out)
    assert weights.task == 'detection' and isinstance(weights.model, RetinaNet)
    assert weights.label_names == list(CLASSES)
    assert weights.preprocessing.input_size == P.DETECTION_INPUT_SIZE
    images = jax.ShapeDtypeStruct((1, 64, 96, 3), np.float32)
    class_logits, _ = jax.eval_shape(weights.model.apply, weights.variables, images)
    assert class_logits[0].shape == (1, 8, 12, 27)

    exported = tmp_path / 'exported.pth'
    assert export_cli.main(['--weights', str(out), '--output', str(exported)]) == 0
    assert "'meta'}" in capsys.readouterr().out
    checkpoint = torch.load(exported, weights_only=True)
    assert checkpoint['meta']['CLASSES'] == CLASSES and checkpoint['meta']['model_name'] == NAME
    expected = without_derived_buffers(state_dict)
    assert sorted(checkpoint['state_dict']) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(checkpoint['state_dict'][key], value), key
    assert os.path.getsize(exported) > 100e6


def test_cli_reports_every_bad_key_and_writes_nothing(tmp_path, small_checkpoint, capsys):
    _, state_dict = small_checkpoint
    bad = {k: v for k, v in state_dict.items() if k != 'bbox_head.retina_reg.bias'}
    bad['neck.lateral_convs.2.conv.weight'] = torch.zeros(16, 384, 1, 1)
    path = tmp_path / 'bad.pth'
    torch.save({'state_dict': bad}, path)
    out = tmp_path / 'out'
    assert convert_cli.main(['--checkpoint', str(path), '--output', str(out)]) == 2
    err = capsys.readouterr().err
    assert 'bbox_head.retina_reg.bias  expected (36)' in err
    assert (
        'neck.lateral_convs.2.conv.weight  expected (16, 768, 1, 1), found (16, 384, 1, 1)' in err
    )
    assert not out.exists()
