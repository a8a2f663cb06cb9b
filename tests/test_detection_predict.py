"""Tests of predict.py with a detection model: a tiny random-weight RetinaNet saved with
save_pretrained, asked about three small images (landscape, portrait, square; up- and
downscaled) and a corrupt file.

The JSON run is shared by the tests (module fixture): the boxes it reports must be those of the
model + postprocess.detect on the prepared input (the COCO evaluation loader's canvas, normalised
here), brought back to the original pixels.
"""

import io
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from random_weights import random_variables

from crossformer_jax.cli import predict as predict_cli
from crossformer_jax.data import coco
from crossformer_jax.detection import postprocess
from crossformer_jax.inference import predict
from crossformer_jax.models import create_model
from crossformer_jax.weights import pretrained as P

NAME = 'retinanet_crossformer_small'
OVERRIDES = dict(
    embed_dim=16,
    depths=(1, 1, 1, 1),
    num_heads=(1, 1, 1, 1),
    fpn_channels=16,
    head_channels=16,
    num_head_convs=1,
)
LABELS = ['cat', 'dog', 'traffic light']  # a name with a space: the text format puts it last
# (short, long) side limits: canvases 64 x 96 (landscape) and 96 x 64 (portrait).
PREPROCESSING = P.Preprocessing((64, 96), 1.0, 'bilinear')
# name: (height, width), resized height, width and the canvas.
IMAGES = {
    'big.png': ((130, 130), (64, 64), (64, 96)),  # square: downscaled by 64 / 130, landscape
    'tall.png': ((90, 50), (96, 53), (96, 64)),  # upscaled by 96 / 90
    'wide.jpg': ((40, 70), (55, 96), (64, 96)),  # upscaled by 96 / 70
}


@pytest.fixture(scope='module')
def detector(tmp_path_factory):
    """(pretrained directory, model, variables) of a tiny 3-class RetinaNet.

    random_variables draws the biases ~ 0.1 N(0, 1), not the prior bias -log(99) of a fresh
    RetinaHead, which would put every score near 0.01, under detect's 0.05 threshold. The saved
    retina_cls has bias 0 and its kernel halved: scores sigmoid(logits) with logits of std about
    0.8 at the finest level, so many boxes and a spread of scores (none saturated at 1, where
    near-ties could swap places between two runs). retina_reg's kernel is divided by 10 so the
    boxes stay near their anchors instead of being clamped to the whole image.
    """
    model = create_model(NAME, num_classes=len(LABELS), **OVERRIDES)
    variables = random_variables(model)
    head = variables['params']['bbox_head']
    head['retina_cls']['bias'] = jnp.zeros_like(head['retina_cls']['bias'])
    head['retina_cls']['kernel'] = head['retina_cls']['kernel'] * 0.5
    head['retina_reg']['kernel'] = head['retina_reg']['kernel'] * 0.1
    directory = str(tmp_path_factory.mktemp('detector') / 'weights')
    P.save_pretrained(
        directory,
        variables,
        model_name=NAME,
        num_classes=len(LABELS),
        features_only=False,
        model_overrides=OVERRIDES,
        preprocessing=PREPROCESSING,
        label_names=LABELS,
    )
    return directory, model, variables


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    """The IMAGES (random pixels) and corrupt.png, in one folder."""
    folder = tmp_path_factory.mktemp('photos')
    rng = np.random.RandomState(0)
    for name, ((height, width), _, _) in IMAGES.items():
        Image.fromarray(rng.randint(0, 256, (height, width, 3), np.uint8)).save(folder / name)
    (folder / 'corrupt.png').write_bytes(b'not an image')
    return folder


def run_cli(argv):
    """(exit status, stdout, stderr) of predict.py's run."""
    out, err = io.StringIO(), io.StringIO()
    code = predict_cli.run_cli(predict_cli.build_arg_parser().parse_args(argv), out, err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope='module')
def json_run(detector, image_folder, tmp_path_factory):
    """(exit status, results by image name, stderr, box dir) of a --json run at threshold 0.05
    (every detection), 2 images per batch."""
    box_dir = str(tmp_path_factory.mktemp('run') / 'boxes')
    argv = ['--weights', detector[0], '--json', '--batch-size', '2', '--box-dir', box_dir]
    code, out, err = run_cli([*argv, '--score-threshold', '0.05', str(image_folder)])
    results = [json.loads(line) for line in out.splitlines()]
    return code, results, err, box_dir


def test_json_lists_each_image_s_boxes_in_its_own_pixels(json_run, image_folder):
    code, results, err, box_dir = json_run
    assert code == 1  # the corrupt file; the others are predicted
    assert f'error: {image_folder / "corrupt.png"}: cannot decode image' in err
    assert '1 image(s) could not be used' in err
    # Batches of one canvas each: the two landscape images first, then the portrait one.
    assert [os.path.basename(r['image']) for r in results] == ['big.png', 'wide.jpg', 'tall.png']
    for result in results:
        name = os.path.basename(result['image'])
        height, width = IMAGES[name][0]
        assert set(result) == {'image', 'drawn', 'detections'}
        detections = result['detections']
        assert 10 <= len(detections) <= 100
        scores = [d['score'] for d in detections]
        assert scores == sorted(scores, reverse=True)
        assert min(scores) > 0.05 and max(scores) < 0.99
        for d in detections:
            assert set(d) == {'label', 'index', 'score', 'box'}
            assert d['label'] == LABELS[d['index']]
            x1, y1, x2, y2 = d['box']
            assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
        assert len({d['index'] for d in detections}) > 1

        # The drawn copy: the image's own size, the best box's class colour on it.
        assert result['drawn'] == os.path.join(box_dir, os.path.splitext(name)[0] + '.png')
        drawn = np.asarray(Image.open(result['drawn']))
        original = np.asarray(Image.open(image_folder / name).convert('RGB'))
        assert drawn.shape == original.shape == (height, width, 3)
        colour = predict.box_colour(detections[0]['index'])
        painted = np.all(drawn == colour, axis=-1).sum()
        assert painted > np.all(original == colour, axis=-1).sum() + min(height, width) // 2


def test_boxes_equal_the_model_and_detect_on_the_prepared_input(detector, json_run, image_folder):
    _, model, variables = detector
    results = {os.path.basename(r['image']): r['detections'] for r in json_run[1]}

    @jax.jit
    def model_and_detect(image, image_size):
        class_logits, box_deltas = model.apply(variables, image[None], train=False)
        return postprocess.detect(
            class_logits, box_deltas, model.anchor_generator, image_size[None]
        )

    mean, std = np.float32(PREPROCESSING.mean), np.float32(PREPROCESSING.std)
    for name, ((height, width), (new_h, new_w), canvas) in IMAGES.items():
        path = str(image_folder / name)
        model_input, original = predict.detection_prepare(path, PREPROCESSING)
        image = model_input['image']
        assert image.shape == (*canvas, 3) and image.dtype == np.uint8
        assert model_input['image_size'].tolist() == [new_h, new_w]
        scale_factor = model_input['scale_factor']
        np.testing.assert_array_equal(scale_factor, np.float32([new_w / width, new_h / height] * 2))
        assert original.shape == (height, width, 3)
        # The pixels are the COCO evaluation loader's resized image on a zero canvas.
        no_boxes = (np.zeros((0, 4), np.float32), np.zeros(0, np.int32), np.zeros(0, bool))
        example = coco.load_example(
            coco.CocoImage(path, 0, height, width, *no_boxes), (96, 64), flip=False
        )
        np.testing.assert_array_equal(image[:new_h, :new_w], example['image'])
        assert not image[new_h:].any() and not image[:, new_w:].any()

        normalised = np.zeros(image.shape, np.float32)
        normalised[:new_h, :new_w] = (image[:new_h, :new_w] / np.float32(255) - mean) / std
        found = jax.device_get(model_and_detect(normalised, model_input['image_size']))
        count = int(found['num_detections'][0])
        boxes = found['boxes'][0, :count] / scale_factor
        # Each axis is divided by its own resize ratio, so the boxes stay inside the image.
        bounds = np.array([width, height, width, height], np.float32)
        assert np.all(boxes <= bounds + 1e-4)
        reported = results[name]
        assert len(reported) == count
        np.testing.assert_allclose(
            [d['box'] for d in reported], np.minimum(boxes, bounds), atol=1e-4
        )
        np.testing.assert_allclose(
            [d['score'] for d in reported], found['scores'][0, :count], atol=1e-5
        )
        assert [d['index'] for d in reported] == found['classes'][0, :count].tolist()


def test_text_output_and_drawn_images_never_overwrite(detector, json_run, image_folder, tmp_path):
    box_dir = tmp_path / 'boxes'
    box_dir.mkdir()
    Image.new('RGB', (4, 4)).save(box_dir / 'big.png')  # a file of the same name is kept
    wide = str(image_folder / 'wide.jpg')  # two landscape images: one batch, one compilation
    big = str(image_folder / 'big.png')
    argv = ['--weights', detector[0], '--box-dir', str(box_dir), '--batch-size', '2']
    argv += ['--score-threshold', '0.5']
    code, out, err = run_cli([*argv, wide, big])
    assert code == 0 and err == ''
    assert Image.open(box_dir / 'big.png').size == (4, 4)
    assert Image.open(box_dir / 'big_1.png').size == (130, 130)

    line_pattern = re.compile(r'  (\d\.\d{3})  ' + r' +(\d+\.\d)' * 4 + r'  (.+)')
    blocks = {}
    for line in out.splitlines():
        if not line.startswith('  '):
            path, drawn = line.split(' -> ')
            blocks[path] = (drawn, [])
            continue
        score, *box, label = line_pattern.fullmatch(line).groups()
        assert label in LABELS
        blocks[path][1].append((float(score), [float(v) for v in box], label))
    assert {p: drawn for p, (drawn, _) in blocks.items()} == {
        wide: str(box_dir / 'wide.png'),
        big: str(box_dir / 'big_1.png'),
    }
    # The same boxes as the JSON run's that score at least 0.5, rounded for printing.
    json_results = {r['image']: r['detections'] for r in json_run[1]}
    for path, (_, lines) in blocks.items():
        expected = [d for d in json_results[path] if d['score'] >= 0.5]
        assert 0 < len(lines) == len(expected)
        for (score, box, label), d in zip(lines, expected):
            assert label == d['label'] and score == pytest.approx(d['score'], abs=5e-4)
            np.testing.assert_allclose(box, d['box'], atol=0.05 + 1e-6)


@pytest.mark.parametrize('value', ['1.5', '-0.1', 'half'])
def test_score_threshold_must_be_a_probability(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        predict_cli.build_arg_parser().parse_args(
            ['--weights', 'w', 'x.jpg', '--score-threshold', value]
        )
    assert exit_info.value.code == 2
    assert '--score-threshold' in capsys.readouterr().err
