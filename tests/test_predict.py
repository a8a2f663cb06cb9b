"""Tests of predict.py, the preprocessing metadata stored with weights, and loading weights from a
pretrained directory or a train.py workdir.

End to end: the digits demo model is trained briefly (in process), then asked about its own
validation images, which it must mostly name by their digit folder.
"""

import importlib.util
import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image
from random_weights import random_variables

from configs import digits_demo
from crossformer_jax.cli import predict as predict_cli
from crossformer_jax.inference import predict
from crossformer_jax.models import create_model
from crossformer_jax.training import trainer
from crossformer_jax.weights import pretrained as P
from crossformer_jax.weights.loading import load_weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'scripts', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def digits_run(tmp_path_factory):
    """The digits image folder and a workdir trained on it for a few dozen steps."""
    root = tmp_path_factory.mktemp('digits')
    data_dir = str(root / 'data')
    _load_script('make_digits_dataset').write_digits(data_dir)
    config = digits_demo.get_config()
    config.data.data_dir = data_dir
    config.model.embed_dim = TINY['embed_dim']
    config.model.depths = TINY['depths']
    config.model.num_heads = TINY['num_heads']
    config.data.num_parallel_calls = 1
    config.data.shuffle_buffer = 256
    config.num_train_steps = 60
    config.warmup_epochs = 1
    config.log_every_steps = 60
    config.eval_every_steps = 60
    config.checkpoint_every_steps = 60
    workdir = str(root / 'workdir')
    trainer.train_and_evaluate(config, workdir)
    return data_dir, workdir


def test_workdir_metadata_names_the_class_folders(digits_run):
    _, workdir = digits_run
    with open(os.path.join(workdir, P.METADATA_FILE)) as f:
        metadata = json.load(f)
    assert metadata['label_names'] == [str(d) for d in range(10)]
    assert metadata['input_size'] == [3, 32, 32]
    assert metadata['crop_pct'] == 1.0
    assert metadata['interpolation'] == 'bicubic'
    assert metadata['mean'] == metadata['std'] == [0.5, 0.5, 0.5]
    assert metadata['model_overrides']['embed_dim'] == 16
    assert 'dtype' not in metadata['model_overrides']


def test_predict_names_most_validation_digits(digits_run, tmp_path, capsys):
    data_dir, workdir = digits_run
    validation = os.path.join(data_dir, 'validation')
    corrupt = tmp_path / 'corrupt.png'
    corrupt.write_bytes(b'not an image')
    missing = str(tmp_path / 'missing.png')
    code = predict_cli.main(
        ['--weights', workdir, '--json', '--batch-size', '64', validation, str(corrupt), missing]
    )
    out, err = capsys.readouterr()
    assert code == 1  # two unusable inputs
    assert f'error: {corrupt}: cannot decode image' in err
    assert f'error: {missing}: no such file or folder' in err
    assert '2 image(s) could not be used' in err
    results = [json.loads(line) for line in out.splitlines()]
    assert len(results) == 359  # every validation image
    right = 0
    for result in results:
        assert len(result['top']) == 5
        probabilities = [t['probability'] for t in result['top']]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0001
        folder = os.path.basename(os.path.dirname(result['image']))
        right += result['top'][0]['label'] == folder
    assert right / len(results) > 0.6, f'{right} of {len(results)} right'


def test_predict_text_output_and_an_older_workdir(digits_run, tmp_path, capsys):
    data_dir, workdir = digits_run
    older = str(tmp_path / 'older')
    shutil.copytree(workdir, older)
    os.remove(os.path.join(older, P.METADATA_FILE))  # a workdir from before metadata.json
    weights = load_weights(older)
    assert weights.label_names is None
    assert weights.preprocessing == P.Preprocessing(
        (32, 32), 1.0, 'bicubic', (0.5,) * 3, (0.5,) * 3
    )
    image = os.path.join(
        data_dir, 'validation', '7', sorted(os.listdir(f'{data_dir}/validation/7'))[0]
    )
    assert predict_cli.main(['--weights', older, '--top-k', '3', image]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == image and len(lines) == 4
    assert all(line.split()[-1] in [str(d) for d in range(10)] for line in lines[1:])


@pytest.fixture(scope='module')
def imagenet_dir(tmp_path_factory):
    """A tiny 1000-class model saved as a pretrained directory (ImageNet defaults)."""
    model = create_model('crossformer_tiny', num_classes=1000, **TINY)
    variables = random_variables(model, (32, 32))
    directory = str(tmp_path_factory.mktemp('pretrained') / 'weights')
    P.save_pretrained(
        directory,
        variables,
        model_name='crossformer_tiny',
        num_classes=1000,
        features_only=False,
        model_overrides=TINY,
        preprocessing=P.Preprocessing(input_size=(32, 32), crop_pct=0.5),
    )
    return directory


def test_pretrained_metadata_records_preprocessing_and_imagenet_labels(imagenet_dir):
    metadata = P.read_metadata(imagenet_dir)
    assert metadata['input_size'] == [3, 32, 32]
    assert metadata['crop_pct'] == 0.5
    assert metadata['interpolation'] == 'bicubic'
    assert metadata['mean'] == list(P.IMAGENET_MEAN) and metadata['std'] == list(P.IMAGENET_STD)
    assert len(metadata['label_names']) == 1000
    assert metadata['label_names'][:2] == ['tench, Tinca tinca', 'goldfish, Carassius auratus']


def test_older_pretrained_directory_loads_with_imagenet_defaults(imagenet_dir, tmp_path, capsys):
    older = str(tmp_path / 'older')
    shutil.copytree(imagenet_dir, older)
    path = os.path.join(older, P.METADATA_FILE)
    with open(path) as f:
        metadata = json.load(f)
    for key in ('input_size', 'crop_pct', 'interpolation', 'mean', 'std', 'label_names'):
        del metadata[key]
    with open(path, 'w') as f:
        json.dump(metadata, f)
    weights = load_weights(older)
    assert weights.preprocessing == P.Preprocessing()  # 224, crop 0.875, bicubic, ImageNet stats
    assert weights.label_names == P.imagenet_label_names()

    photo = tmp_path / 'photo.jpg'
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (180, 240, 3), np.uint8)).save(photo)
    assert predict_cli.main(['--weights', older, '--json', str(photo)]) == 0
    (result,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all(t['label'] == weights.label_names[t['index']] for t in result['top'])


def test_preprocessing_follows_the_metadata(tmp_path):
    photo = tmp_path / 'wide.png'
    pixels = np.random.RandomState(1).randint(0, 255, (40, 80, 3), np.uint8)
    Image.fromarray(pixels).save(photo)
    # crop_pct 1 and an image already at the short side: only the centre crop and the scaling.
    x = predict.preprocess_image(
        str(photo), P.Preprocessing((40, 40), 1.0, 'bicubic', (0.5,) * 3, (0.25,) * 3)
    )
    np.testing.assert_allclose(x, (pixels[:, 20:60] / 255.0 - 0.5) / 0.25, rtol=1e-6, atol=1e-6)
    assert predict.preprocess_image(str(photo), P.Preprocessing((32, 32), 0.5)).shape == (32, 32, 3)


def test_unusable_preprocessing_fields_are_named():
    with pytest.raises(P.PretrainedError, match='crop_pct'):
        P.preprocessing_from_metadata({'crop_pct': 1.5})
    with pytest.raises(P.PretrainedError, match='interpolation'):
        P.preprocessing_from_metadata({'interpolation': 'lanczos7'})
    with pytest.raises(P.PretrainedError, match=r'\[3, H, W\]'):
        P.preprocessing_from_metadata({'input_size': [224, 224]})


def test_a_backbone_has_nothing_to_predict(tmp_path, capsys):
    model = create_model('crossformer_tiny', features_only=True, **TINY)
    variables = random_variables(model, (32, 32))
    directory = str(tmp_path / 'backbone')
    P.save_pretrained(
        directory,
        variables,
        model_name='crossformer_tiny',
        num_classes=None,
        features_only=True,
        model_overrides=TINY,
    )
    assert predict_cli.main(['--weights', directory, str(tmp_path)]) == 2
    assert 'holds a backbone model, which has no predictions' in capsys.readouterr().err


def test_evaluate_names_config_fields_that_differ_from_the_weights():
    config = digits_demo.get_config()  # 32 px, crop 1.0, mean/std 0.5
    problems = trainer.preprocessing_differences(config, {})  # older: ImageNet defaults
    assert [p.split('=')[0] for p in problems] == ['input_size', 'crop_pct', 'mean', 'std']
    stored = P.Preprocessing((32, 32), 1.0, 'bicubic', (0.5,) * 3, (0.5,) * 3).to_metadata()
    assert trainer.preprocessing_differences(config, stored) == []


def test_segmentation_model_writes_a_colour_coded_mask_per_image(tmp_path, capsys):
    name = 'upernet_crossformer_small'
    overrides = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), head_channels=32)
    model = create_model(name, num_classes=4, **overrides)
    variables = random_variables(model)
    directory = str(tmp_path / 'segmenter')
    P.save_pretrained(
        directory,
        dict(variables),
        model_name=name,
        num_classes=4,
        features_only=False,
        model_overrides=overrides,
        preprocessing=P.Preprocessing((64, 64), 1.0, 'bilinear'),
    )
    assert P.read_metadata(directory)['interpolation'] == 'bilinear'
    photo = tmp_path / 'street.jpg'
    Image.fromarray(np.random.RandomState(2).randint(0, 255, (32, 64, 3), np.uint8)).save(photo)
    masks = tmp_path / 'masks'
    code = predict_cli.main(
        ['--weights', directory, '--json', '--mask-dir', str(masks), str(photo)]
    )
    assert code == 0
    (result,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert result['mask'] == str(masks / 'street.png')
    mask = Image.open(result['mask'])
    assert mask.mode == 'P' and mask.size == (64, 32)  # the image's own size
    assert mask.getpalette()[:12] == predict.class_colours(4).ravel().tolist()

    # Pixel values are the model's classes on the prepared input: the whole image (its long side
    # already the input size), zero-padded below to 64x64.
    preprocessing = P.Preprocessing((64, 64), 1.0, 'bilinear')
    prepared, info = predict.segmentation_prepare(str(photo), preprocessing)
    assert info == (32, 64, 32, 64) and not prepared[32:].any()
    logits = jax.jit(model.apply, static_argnames='train')(variables, prepared[None], train=False)
    expected = np.asarray(np.argmax(logits[0, :32], axis=-1))
    np.testing.assert_array_equal(np.asarray(mask), expected)
    fractions = {c['index']: c['fraction'] for c in result['classes']}
    assert sum(fractions.values()) == pytest.approx(1.0)
    assert fractions == pytest.approx({k: np.mean(expected == k) for k in np.unique(expected)})
