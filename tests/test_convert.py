"""Tests of the PyTorch -> Flax converter, the pretrained directory format and the CLI."""

import json
import os
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from crossformer_jax.cli import convert as convert_cli
from crossformer_jax.models import create_model
from crossformer_jax.models.crossformer import VARIANTS
from crossformer_jax.reference.crossformer import create_torch_model, randomize_parameters
from crossformer_jax.weights import convert as C
from crossformer_jax.weights import pretrained as P
from crossformer_jax.weights import torch_io, verify

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'convert_torch_weights.py')

# Reduced configurations (the widths, heads and groups of the real variants, fewer blocks) that
# still have the derived v1 buffers and, for ++, an ACL (stage 2 depth 4: block 2 has ex_conv).
SMALL_V1 = ('crossformer_tiny', dict(depths=(1, 1, 2, 1)))
SMALL_PP = ('crossformer_pp_small', dict(depths=(1, 1, 4, 1)))


def torch_state_dict(name, overrides, features_only=False, num_classes=1000, seed=0):
    model = create_torch_model(
        name, num_classes=num_classes, features_only=features_only, **overrides
    )
    return randomize_parameters(model, seed).state_dict()


@pytest.fixture(scope='module')
def v1_classifier():
    return torch_state_dict(*SMALL_V1, num_classes=10)


@pytest.fixture(scope='module')
def pp_backbone():
    return torch_state_dict(*SMALL_PP, features_only=True)


def flat_torch_like(variables):
    return C.flax_to_torch_state_dict(variables)


def assert_matches_state_dict(variables, state_dict):
    """Every converted parameter equals its PyTorch tensor (after the layout change)."""
    back = flat_torch_like(variables)
    expected = {k: v.numpy() for k, v in state_dict.items() if not C.is_derived_buffer(k)}
    assert sorted(back) == sorted(expected)
    for k in expected:
        np.testing.assert_array_equal(back[k], expected[k], err_msg=k)


def forward_pair(state_dict, variables, name, overrides, features_only, num_classes, size=(64, 96)):
    """Outputs of the PyTorch model holding state_dict and of the Flax model holding variables."""
    torch_model = create_torch_model(
        name, num_classes=num_classes, features_only=features_only, **overrides
    )
    torch_model.load_state_dict(state_dict, strict=True)
    images = np.random.default_rng(1).standard_normal((2, 3, *size)).astype(np.float32)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(images))
    model = create_model(name, num_classes=num_classes, features_only=features_only, **overrides)
    out = jax.jit(model.apply)(variables, images.transpose(0, 2, 3, 1))
    if features_only:
        return [r.numpy() for r in ref], [np.asarray(o).transpose(0, 3, 1, 2) for o in out]
    return [ref.numpy()], [np.asarray(out)]


# -------------------------------------------------------------------------------------------------
# Conversion.


def test_v1_classifier_converts_and_skips_derived_buffers(v1_classifier):
    name, overrides = SMALL_V1
    derived = [k for k in v1_classifier if C.is_derived_buffer(k)]
    assert len(derived) == 2 * sum(overrides['depths'])  # biases + relative_position_index
    variables, report = C.convert_with_report(v1_classifier, name, **overrides)
    assert report.features_only is False and report.num_classes == 10
    assert report.skipped_buffers == sorted(derived, key=torch_io.natural_key)
    params = variables['params']
    assert params['head']['kernel'].shape == (512, 10)
    assert params['patch_embed']['projs_0']['kernel'].shape == (4, 4, 3, 32)
    assert all(v.dtype == np.float32 for v in jax.tree.leaves(variables))
    assert_matches_state_dict(variables, v1_classifier)
    # Exact layout transforms of one Linear and one conv.
    np.testing.assert_array_equal(
        params['layers_0']['blocks_0']['attn']['qkv']['kernel'],
        v1_classifier['layers.0.blocks.0.attn.qkv.weight'].numpy().T,
    )
    np.testing.assert_array_equal(
        params['patch_embed']['projs_3']['kernel'],
        v1_classifier['patch_embed.projs.3.weight'].numpy().transpose(2, 3, 1, 0),
    )
    refs, outs = forward_pair(v1_classifier, variables, name, overrides, False, 10)
    for r, o in zip(refs, outs):
        assert np.max(np.abs(r - o)) <= 1e-4 * np.max(np.abs(r))


def test_backbone_detected_without_head(pp_backbone):
    name, overrides = SMALL_PP
    assert not any(C.is_derived_buffer(k) for k in pp_backbone)
    assert any('.ex_conv.' in k for k in pp_backbone)
    variables, report = C.convert_with_report(pp_backbone, name, **overrides)
    assert report.features_only is True and report.num_classes is None
    assert 'head' not in variables['params'] and 'norm' not in variables['params']
    assert 'ex_conv' in variables['params']['layers_2']['blocks_2']
    assert_matches_state_dict(variables, pp_backbone)
    refs, outs = forward_pair(pp_backbone, variables, name, overrides, True, 1000)
    assert len(outs) == 4
    for r, o in zip(refs, outs):
        assert np.max(np.abs(r - o)) <= 1e-4 * np.max(np.abs(r))


def test_numpy_values_and_module_prefix(v1_classifier):
    name, overrides = SMALL_V1
    reference = C.convert_torch_state_dict(v1_classifier, name, **overrides)
    prefixed = {f'module.{k}': v.numpy() for k, v in v1_classifier.items()}
    converted = C.convert_torch_state_dict(prefixed, name, **overrides)
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(converted)):
        np.testing.assert_array_equal(a, b)


def test_mismatch_error_lists_every_key_with_shapes(v1_classifier):
    name, overrides = SMALL_V1
    bad = dict(v1_classifier)
    del bad['layers.1.blocks.0.mlp.fc1.bias']
    del bad['norm.weight']
    bad['layers.0.blocks.0.attn.qkv.weight'] = torch.zeros(64, 192)  # transposed
    bad['patch_embed.projs.1.weight'] = torch.zeros(16, 3, 4, 4)  # wrong kernel
    bad['neck.conv.weight'] = torch.zeros(3, 5)
    bad['layers.0.blocks.0.attn.extra'] = torch.zeros(7)
    with pytest.raises(C.StateDictMismatchError) as info:
        C.convert_torch_state_dict(bad, name, **overrides)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.missing == ['layers.1.blocks.0.mlp.fc1.bias', 'norm.weight']
    assert err.unexpected == ['layers.0.blocks.0.attn.extra', 'neck.conv.weight']
    assert err.mismatched == {
        'patch_embed.projs.1.weight': ((16, 3, 8, 8), (16, 3, 4, 4)),
        'layers.0.blocks.0.attn.qkv.weight': ((192, 64), (64, 192)),
    }
    text = str(err)
    for line in (
        'layers.1.blocks.0.mlp.fc1.bias  expected (512)',
        'norm.weight  expected (512)',
        'neck.conv.weight  found (3, 5)',
        'layers.0.blocks.0.attn.extra  found (7)',
        'layers.0.blocks.0.attn.qkv.weight  expected (192, 64), found (64, 192)',
        'patch_embed.projs.1.weight  expected (16, 3, 8, 8), found (16, 3, 4, 4)',
    ):
        assert line in text, line
    assert '2 missing, 2 unexpected, 2 with the wrong shape' in text


def test_explicit_num_classes_and_features_only(v1_classifier):
    name, overrides = SMALL_V1
    with pytest.raises(
        C.StateDictMismatchError,
        match=r'head.weight  expected \(1000, 512\), '
        r'found \(10, 512\)',
    ):
        C.convert_torch_state_dict(v1_classifier, name, num_classes=1000, **overrides)
    # A classifier state dict used as a backbone: head and norm are unused keys, not dropped.
    with pytest.raises(C.StateDictMismatchError) as info:
        C.convert_torch_state_dict(v1_classifier, name, features_only=True, **overrides)
    assert info.value.unexpected == ['head.bias', 'head.weight', 'norm.bias', 'norm.weight']


def test_non_array_value_is_reported(v1_classifier):
    name, overrides = SMALL_V1
    bad = dict(v1_classifier)
    bad['head.bias'] = 'not a tensor'
    with pytest.raises(C.StateDictMismatchError, match='head.bias  str value'):
        C.convert_torch_state_dict(bad, name, **overrides)


# -------------------------------------------------------------------------------------------------
# Checkpoint layouts.


def test_extract_state_dict_layouts(v1_classifier, pp_backbone):
    sd, skipped = torch_io.extract_state_dict({'model': v1_classifier, 'optimizer': {}, 'epoch': 3})
    assert sd.keys() == v1_classifier.keys() and skipped == []
    sd, skipped = torch_io.extract_state_dict(dict(v1_classifier))
    assert sd.keys() == v1_classifier.keys() and skipped == []
    sd, _ = torch_io.extract_state_dict(
        {'model': {f'module.{k}': v for k, v in v1_classifier.items()}}
    )
    assert sd.keys() == v1_classifier.keys()
    assert all(sd[k] is v1_classifier[k] for k in sd)

    detection = {f'backbone.{k}': v for k, v in pp_backbone.items()}
    detection.update(
        {
            'neck.lateral_convs.0.conv.weight': torch.zeros(256, 64, 1, 1),
            'decode_head.conv_seg.bias': torch.zeros(150),
        }
    )
    for prefix in ('', 'module.'):
        checkpoint = {
            'meta': {'epoch': 12, 'CLASSES': ('a', 'b')},
            'state_dict': {prefix + k: v for k, v in detection.items()},
            'optimizer': {},
        }
        sd, skipped = torch_io.extract_state_dict(checkpoint)
        assert sd.keys() == pp_backbone.keys()
        assert skipped == ['decode_head.conv_seg.bias', 'neck.lateral_convs.0.conv.weight']
    name, overrides = SMALL_PP
    variables = C.convert_torch_state_dict(sd, name, **overrides)
    assert_matches_state_dict(variables, pp_backbone)


@pytest.mark.parametrize(
    'checkpoint, match',
    [
        ([torch.zeros(3)], 'holds a list'),
        ({'epoch': 3, 'args': {'lr': 1}}, "no state dict found.*'epoch', 'args'"),
        ({}, 'no state dict found'),
    ],
)
def test_extract_state_dict_rejects(checkpoint, match):
    with pytest.raises(torch_io.CheckpointError, match=match):
        torch_io.extract_state_dict(checkpoint)


# -------------------------------------------------------------------------------------------------
# Reading checkpoint files.


def _write_bad_files(directory):
    """name -> (path, expected message fragment)."""
    marker = os.path.join(directory, 'payload_ran')

    class Payload:
        def __reduce__(self):  # unpickling would create `marker`
            return (open, (marker, 'w'))

    good = os.path.join(directory, 'good.pth')
    torch.save({'model': {'w': torch.ones(4)}}, good)
    data = open(good, 'rb').read()
    files = {
        'empty': (b'', 'file is empty'),
        'truncated': (data[: len(data) // 2], 'corrupt or truncated'),
        'text': (b'this is a text file, not weights\n', 'not a PyTorch checkpoint'),
        'random': (np.random.default_rng(0).bytes(4096), 'not a PyTorch checkpoint'),
        'pickle_payload': (
            pickle.dumps({'model': Payload()}, protocol=2),
            'refused to unpickle io.open',
        ),
    }
    out = {}
    for label, (content, message) in files.items():
        path = os.path.join(directory, f'{label}.pth')
        with open(path, 'wb') as f:
            f.write(content)
        out[label] = (path, message)
    # The same payload inside a torch zip checkpoint.
    zipped = os.path.join(directory, 'zip_payload.pth')
    torch.save({'model': Payload()}, zipped)
    out['zip_payload'] = (zipped, 'refused to unpickle io.open')
    out['missing'] = (os.path.join(directory, 'nope.pth'), 'no such file')
    out['directory'] = (directory, 'is a directory')
    return out, marker


def test_read_torch_checkpoint_errors(tmp_path):
    files, marker = _write_bad_files(str(tmp_path))
    for label, (path, message) in files.items():
        with pytest.raises(torch_io.CheckpointError) as info:
            torch_io.read_torch_checkpoint(path)
        text = str(info.value)
        assert path in text and message in text, (label, text)
        assert '\n' not in text, (label, text)
    assert not os.path.exists(marker)
    good = torch_io.read_torch_checkpoint(os.path.join(str(tmp_path), 'good.pth'))
    assert good['model']['w'].shape == (4,)


# -------------------------------------------------------------------------------------------------
# Model name inference, on shape-only state dicts of the full-size reference models.


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_infer_model_name_and_key_sets_of_every_variant(name):
    with torch.device('meta'):
        classifier = create_torch_model(name).state_dict()
    assert C.infer_model_name(classifier) == name
    # The reference's keys and shapes are exactly what the Flax model expects.
    report = C.check_torch_state_dict(classifier, name)
    assert report.num_classes == 1000
    expected_buffers = 2 * sum(VARIANTS[name]['depths']) if VARIANTS[name]['version'] == 'v1' else 0
    assert len(report.skipped_buffers) == expected_buffers
    detection = {
        f'module.backbone.{k}': v
        for k, v in classifier.items()
        if not k.startswith(('head.', 'norm.'))
    }
    backbone, _ = torch_io.extract_state_dict({'state_dict': detection})
    assert C.infer_model_name(backbone) == name
    assert C.infer_model_name(detection) == name


def test_infer_model_name_errors():
    with torch.device('meta'):
        sd = create_torch_model('crossformer_small').state_dict()
    odd = {k: v for k, v in sd.items() if not k.startswith('layers.2.blocks.5.')}
    with pytest.raises(
        C.ModelNameError,
        match=r'no registered CrossFormer variant matches.*'
        r'embed_dim=96, depths=\(2, 2, 5, 2\)',
    ):
        C.infer_model_name(odd)
    with pytest.raises(C.ModelNameError, match='is this a CrossFormer checkpoint'):
        C.infer_model_name({'fc.weight': torch.empty(10, 3, device='meta')})


# -------------------------------------------------------------------------------------------------
# Pretrained directories.


def test_save_load_round_trip(tmp_path, pp_backbone):
    name, overrides = SMALL_PP
    variables = C.convert_torch_state_dict(pp_backbone, name, **overrides)
    target = tmp_path / 'weights'
    P.save_pretrained(
        target,
        variables,
        model_name=name,
        num_classes=None,
        features_only=True,
        model_overrides=overrides,
        extra_metadata={'source_file': 'x.pth'},
    )
    assert sorted(os.listdir(tmp_path)) == ['weights']  # no temporary directory left behind
    metadata = json.loads((target / P.METADATA_FILE).read_text())
    assert metadata['model_name'] == name and metadata['features_only'] is True
    assert metadata['source_file'] == 'x.pth' and metadata['converter_version']
    assert metadata['num_params'] == sum(v.numel() for v in pp_backbone.values())
    model, restored = P.load_pretrained(target)
    assert model.features_only and tuple(model.depths) == overrides['depths']
    assert all(str(v.dtype) == 'float32' for v in jax.tree.leaves(restored))
    assert_matches_state_dict(restored, pp_backbone)
    refs, outs = forward_pair(pp_backbone, restored, name, overrides, True, 1000)
    for r, o in zip(refs, outs):
        assert np.max(np.abs(r - o)) <= 1e-4 * np.max(np.abs(r))


def test_save_refuses_existing_and_overwrites_atomically(tmp_path, v1_classifier, monkeypatch):
    name, overrides = SMALL_V1
    variables = C.convert_torch_state_dict(v1_classifier, name, **overrides)
    kwargs = dict(model_name=name, num_classes=10, features_only=False, model_overrides=overrides)

    occupied = tmp_path / 'occupied'
    occupied.mkdir()
    (occupied / 'keep.txt').write_text('precious')
    with pytest.raises(P.PretrainedError, match='already exists'):
        P.save_pretrained(occupied, variables, **kwargs)
    # Not a pretrained directory: even overwrite=True leaves it alone.
    with pytest.raises(P.PretrainedError, match='refusing to overwrite'):
        P.save_pretrained(occupied, variables, overwrite=True, **kwargs)
    assert (
        os.listdir(occupied) == ['keep.txt'] and (occupied / 'keep.txt').read_text() == 'precious'
    )

    target = tmp_path / 'weights'
    P.save_pretrained(target, variables, **kwargs)
    first = (target / P.METADATA_FILE).read_text()

    # A failure while writing (here: when renaming into place) keeps the old directory intact and
    # removes the temporary one.
    real_rename = os.rename

    def failing_rename(src, dst):
        if '.tmp-' in os.path.basename(src):
            raise KeyboardInterrupt
        return real_rename(src, dst)

    monkeypatch.setattr(P.os, 'rename', failing_rename)
    with pytest.raises(KeyboardInterrupt):
        P.save_pretrained(
            target, variables, overwrite=True, **{**kwargs, 'extra_metadata': {'v': 2}}
        )
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ['occupied', 'weights']
    assert (target / P.METADATA_FILE).read_text() == first

    # Interrupted before anything is in place: no output at all.
    monkeypatch.setattr(P.os, 'rename', failing_rename)
    with pytest.raises(KeyboardInterrupt):
        P.save_pretrained(tmp_path / 'fresh', variables, **kwargs)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ['occupied', 'weights']

    P.save_pretrained(target, variables, overwrite=True, extra_metadata={'v': 2}, **kwargs)
    assert json.loads((target / P.METADATA_FILE).read_text())['v'] == 2
    assert sorted(os.listdir(tmp_path)) == ['occupied', 'weights']
    model, restored = P.load_pretrained(target)
    assert model.num_classes == 10
    assert_matches_state_dict(restored, v1_classifier)


def test_load_pretrained_errors(tmp_path, v1_classifier):
    with pytest.raises(P.PretrainedError, match='no pretrained directory'):
        P.load_pretrained(tmp_path / 'absent')
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(P.PretrainedError, match='metadata.json is missing'):
        P.load_pretrained(empty)
    name, overrides = SMALL_V1
    variables = C.convert_torch_state_dict(v1_classifier, name, **overrides)
    target = tmp_path / 'w'
    P.save_pretrained(
        target,
        variables,
        model_name=name,
        num_classes=10,
        features_only=False,
        model_overrides=overrides,
    )
    metadata = json.loads((target / P.METADATA_FILE).read_text())
    # The metadata describes another architecture than the stored arrays.
    (target / P.METADATA_FILE).write_text(json.dumps({**metadata, 'model_overrides': {}}))
    with pytest.raises(P.PretrainedError, match='cannot restore'):
        P.load_pretrained(target)
    os.rename(target / P.VARIABLES_DIR, tmp_path / 'moved')
    with pytest.raises(P.PretrainedError, match='variables/ is missing'):
        P.load_pretrained(target)


# -------------------------------------------------------------------------------------------------
# The command line.


def run_cli(*args):
    return subprocess.run(
        [sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=REPO, timeout=600
    )


@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
    """A full-size crossformer_tiny classification checkpoint with random weights (~110 MB)."""
    path = tmp_path_factory.mktemp('ckpt') / 'crossformer_tiny.pth'
    model = randomize_parameters(create_torch_model('crossformer_tiny'), seed=3)
    torch.save({'model': model.state_dict(), 'epoch': 299}, path)
    return path


def test_cli_converts_and_verifies(tmp_path, tiny_checkpoint):
    out = tmp_path / 'tiny'
    result = run_cli('--checkpoint', str(tiny_checkpoint), '--output', str(out), '--verify')
    assert result.returncode == 0, result.stderr
    assert 'inferred model: crossformer_tiny' in result.stdout
    assert 'parameters: 27,776,794' in result.stdout
    assert 'skipped keys: 32' in result.stdout
    assert 'verification passed' in result.stdout
    line = next(s for s in result.stdout.splitlines() if s.strip().startswith('logits'))
    assert 'ok' in line
    model, _variables = P.load_pretrained(out)
    assert model.num_classes == 1000 and model.embed_dim == 64
    metadata = P.read_metadata(out)
    assert metadata['source_file'] == str(tiny_checkpoint)


def test_cli_user_errors(tmp_path, tiny_checkpoint):
    files, marker = _write_bad_files(str(tmp_path))
    cases = [
        (['--checkpoint', path], message)
        for label, (path, message) in files.items()
        if label in ('empty', 'truncated', 'text', 'pickle_payload')
    ]
    occupied = tmp_path / 'occupied'
    occupied.mkdir()
    (occupied / 'keep.txt').write_text('precious')
    cases.append(
        (
            ['--checkpoint', str(tiny_checkpoint), '--output', str(occupied)],
            'already exists; pass --overwrite',
        )
    )
    for args, message in cases:
        if '--output' not in args:
            args = [*args, '--output', str(tmp_path / 'out')]
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert 'Traceback' not in result.stderr, result.stderr
        assert result.stderr.startswith('error: ') and result.stderr.count('\n') == 1
    assert not os.path.exists(marker)
    assert not os.path.exists(tmp_path / 'out')
    assert (
        os.listdir(occupied) == ['keep.txt'] and (occupied / 'keep.txt').read_text() == 'precious'
    )


def test_cli_in_process_model_errors_and_failed_verification(
    tmp_path, tiny_checkpoint, monkeypatch, capsys
):
    out = tmp_path / 'out'
    assert (
        convert_cli.main(
            [
                '--checkpoint',
                str(tiny_checkpoint),
                '--output',
                str(out),
                '--model',
                'crossformer_huge',
            ]
        )
        == 2
    )
    assert "unknown model 'crossformer_huge'" in capsys.readouterr().err
    assert (
        convert_cli.main(
            [
                '--checkpoint',
                str(tiny_checkpoint),
                '--output',
                str(out),
                '--model',
                'crossformer_small',
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert 'state dict does not match crossformer_small' in err
    assert 'the weights look like crossformer_tiny' in err

    def failing_comparison(*args, **kwargs):
        return [verify.Comparison('logits', (1, 1000), 1.0, 2.0)]

    monkeypatch.setattr(verify, 'compare_with_torch', failing_comparison)
    assert (
        convert_cli.main(
            [
                '--checkpoint',
                str(tiny_checkpoint),
                '--output',
                str(out),
                '--verify',
                '--num-classes',
                '1000',
            ]
        )
        == 1
    )
    captured = capsys.readouterr()
    assert 'FAILED' in captured.out and 'verification failed' in captured.err
    assert not os.path.exists(out)


def test_cli_verify_fails_for_real_at_a_tiny_tolerance_and_overwrite_replaces(
    tmp_path, tiny_checkpoint, capsys
):
    """--verify at a non-square --image-size: a real comparison that fails at tolerance 1e-12
    (float32 cannot agree that closely) and writes nothing; its relative difference is far inside
    the default tolerance (1e-4; test_cli_converts_and_verifies sees that pass); --overwrite
    replaces an existing conversion."""
    out = tmp_path / 'tiny'
    convert = ['--checkpoint', str(tiny_checkpoint), '--output', str(out)]
    assert (
        convert_cli.main([*convert, '--verify', '--image-size', '64x96', '--tolerance', '1e-12'])
        == 1
    )
    captured = capsys.readouterr()
    assert 'verifying against the PyTorch reference at 64x96' in captured.out
    line = next(s for s in captured.out.splitlines() if s.strip().startswith('logits (1, 1000)'))
    relative = float(line.split('relative ')[1].split()[0])
    assert 1e-12 < relative < 5e-6 and 'FAILED (tolerance 1e-12)' in line
    assert 'verification failed' in captured.err and not os.path.exists(out)

    assert convert_cli.main(convert) == 0
    assert 'wrote ' in capsys.readouterr().out
    assert P.read_metadata(out)['source_file'] == str(tiny_checkpoint)

    # The same weights from another file: refused without --overwrite, replaced with it.
    other = tmp_path / 'copy.pth'
    other.write_bytes(tiny_checkpoint.read_bytes())
    replace = ['--checkpoint', str(other), '--output', str(out)]
    assert convert_cli.main(replace) == 2
    assert 'already exists; pass --overwrite' in capsys.readouterr().err
    assert P.read_metadata(out)['source_file'] == str(tiny_checkpoint)
    assert convert_cli.main([*replace, '--overwrite']) == 0
    assert P.read_metadata(out)['source_file'] == str(other)
    assert sorted(os.listdir(tmp_path)) == ['copy.pth', 'tiny']  # no temporary left behind
