"""Tests of predict.py with a Mask R-CNN model: a tiny random-weight Mask R-CNN saved with
save_pretrained, asked about two small landscape images (one batch: one compilation; the portrait
canvas is detection_prepare's, tested with RetinaNet) and a corrupt file.

The JSON run is shared by the tests (module fixture): its boxes and masks must be those of the
instance segmentation evaluation (segment_step on the COCO evaluation loader's batch), the masks
pasted into the original image by the COCO evaluator's paste_mask.
"""

import functools
import io
import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util
from random_weights import random_variables

from crossformer_jax.cli import predict as predict_cli
from crossformer_jax.data import coco
from crossformer_jax.data.config import COCO_DEFAULTS
from crossformer_jax.evaluators.coco import paste_mask
from crossformer_jax.inference import predict
from crossformer_jax.models import create_model
from crossformer_jax.runtime.compile_options import inference_compiler_options
from crossformer_jax.tasks.instance_segmentation import TWO_STAGE_DEFAULTS, segment_step
from crossformer_jax.weights import pretrained as P

NAME = 'mask_rcnn_crossformer_small'
OVERRIDES = dict(
    embed_dim=16,
    depths=(1, 1, 1, 1),
    num_heads=(1, 2, 4, 8),
    fpn_channels=16,
    rpn_channels=8,
    box_conv_channels=8,
    box_fc_channels=32,
    mask_channels=8,
    num_mask_convs=1,
)
LABELS = ['cat', 'dog', 'traffic light']  # a name with a space: the text format puts it last
# (short, long) side limits: the landscape canvas is 64 x 96.
PREPROCESSING = P.Preprocessing((64, 96), 1.0, 'bilinear')
CANVAS = (64, 96)
# name: (height, width); both landscape: big is downscaled to 64 x 64, wide upscaled to 55 x 96.
IMAGES = {'big.png': (130, 130), 'wide.jpg': (40, 70)}
THRESHOLD = 0.5  # keeps about a third of big.png's 100 detections, most of wide.jpg's


@pytest.fixture(scope='module')
def segmenter(tmp_path_factory):
    """(pretrained directory, model, variables) of a tiny 3-class Mask R-CNN. With random
    weights its 4-way softmax gives scores of 0.1 to 0.8 and its mask probabilities spread
    around 0.5, so the masks hold pixels on both sides of the threshold."""
    model = create_model(NAME, num_classes=len(LABELS), **OVERRIDES)
    variables = random_variables(model)
    directory = str(tmp_path_factory.mktemp('segmenter') / 'weights')
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
    for name, (height, width) in IMAGES.items():
        Image.fromarray(rng.randint(0, 256, (height, width, 3), np.uint8)).save(folder / name)
    (folder / 'corrupt.png').write_bytes(b'not an image')
    return folder


@pytest.fixture(scope='module')
def json_run(segmenter, image_folder, tmp_path_factory):
    """(exit status, results by image name, stderr, box dir) of a --json run at THRESHOLD, 2
    images per batch, into a box dir that already holds a big.png."""
    box_dir = tmp_path_factory.mktemp('run') / 'boxes'
    box_dir.mkdir()
    Image.new('RGB', (4, 4)).save(box_dir / 'big.png')
    argv = ['--weights', segmenter[0], '--json', '--batch-size', '2', '--box-dir', str(box_dir)]
    argv += ['--score-threshold', str(THRESHOLD), str(image_folder)]
    out, err = io.StringIO(), io.StringIO()
    code = predict_cli.run_cli(predict_cli.build_arg_parser().parse_args(argv), out, err)
    results = {
        os.path.basename(r['image']): r for r in map(json.loads, out.getvalue().splitlines())
    }
    return code, results, err.getvalue(), box_dir


def evaluation_outputs(model, variables, image_folder):
    """segment_step's outputs (numpy) for the IMAGES as the COCO evaluation batches them: the
    loader's resized images on a zero uint8 canvas, normalised with config.data's mean and std."""
    batch = {
        'image': np.zeros((len(IMAGES), *CANVAS, 3), np.uint8),
        'image_size': np.zeros((len(IMAGES), 2), np.int32),
        'scale_factor': np.zeros((len(IMAGES), 4), np.float32),
        'image_id': np.arange(len(IMAGES), dtype=np.int32),
        'mask': np.ones(len(IMAGES), bool),
    }
    no_boxes = (np.zeros((0, 4), np.float32), np.zeros(0, np.int32), np.zeros(0, bool))
    for row, (name, (height, width)) in enumerate(IMAGES.items()):
        image = coco.CocoImage(str(image_folder / name), row, height, width, *no_boxes)
        example = coco.load_example(image, (96, 64), flip=False)
        new_h, new_w = example['image'].shape[:2]
        batch['image'][row, :new_h, :new_w] = example['image']
        batch['image_size'][row] = new_h, new_w
        batch['scale_factor'][row] = example['scale_factor']
    data_config = ml_collections.ConfigDict(
        {'mean': COCO_DEFAULTS['mean'], 'std': COCO_DEFAULTS['std']}
    )
    step = functools.partial(
        segment_step,
        model=model,
        data_config=data_config,
        pre_nms_top_k=TWO_STAGE_DEFAULTS['test_pre_nms_top_k'],
        max_proposals=TWO_STAGE_DEFAULTS['test_proposals'],
    )
    # Compiled as the evaluation compiles it (InstanceSegmentationTask.make_evaluator).
    step = jax.jit(step, compiler_options=inference_compiler_options())
    return jax.device_get(step(variables, batch))


def test_boxes_and_masks_are_those_of_the_evaluation(segmenter, json_run, image_folder):
    _, model, variables = segmenter
    code, results, err, _ = json_run
    assert code == 1  # the corrupt file; the others are predicted
    assert f'error: {image_folder / "corrupt.png"}: cannot decode image' in err
    assert '1 image(s) could not be used' in err
    assert sorted(results) == sorted(IMAGES)

    found = evaluation_outputs(model, variables, image_folder)
    for row, (name, (height, width)) in enumerate(IMAGES.items()):
        result = results[name]
        assert set(result) == {'image', 'drawn', 'detections'}
        count = int(found['num_detections'][row])
        scores = found['scores'][row, :count]
        kept = [i for i in np.argsort(-scores, kind='stable') if scores[i] >= THRESHOLD]
        detections = result['detections']
        assert 3 <= len(detections) == len(kept)
        bounds = np.float32([width, height, width, height])
        boxes = found['boxes'][row]
        np.testing.assert_allclose(
            [d['box'] for d in detections], np.clip(boxes[kept], 0, bounds), atol=1e-4
        )
        np.testing.assert_allclose([d['score'] for d in detections], scores[kept], atol=1e-6)
        assert [d['index'] for d in detections] == found['classes'][row, kept].tolist()
        for d, i in zip(detections, kept):
            assert set(d) == {'label', 'index', 'score', 'box', 'mask', 'area'}
            assert d['label'] == LABELS[d['index']]
            assert d['mask']['size'] == [height, width] and isinstance(d['mask']['counts'], str)
            decoded = mask_util.decode(d['mask'])
            expected = paste_mask(found['masks'][row, i], boxes[i], height, width)
            np.testing.assert_array_equal(decoded, expected)
            assert d['area'] == expected.sum()
        areas = [d['area'] for d in detections]
        assert max(areas) > 0 and min(areas) < height * width  # neither all empty nor full


def test_drawn_images_show_the_masks_and_never_overwrite(json_run):
    _, results, _, box_dir = json_run
    assert Image.open(box_dir / 'big.png').size == (4, 4)  # the file that was there is kept
    assert results['big.png']['drawn'] == str(box_dir / 'big_1.png')
    assert results['wide.jpg']['drawn'] == str(box_dir / 'wide.png')
    for name, (height, width) in IMAGES.items():
        drawn = np.asarray(Image.open(results[name]['drawn']))
        original = coco.decode_rgb(results[name]['image'])
        assert drawn.shape == original.shape == (height, width, 3)
        masks = [mask_util.decode(d['mask']) for d in results[name]['detections']]
        union = np.any(masks, axis=0)
        changed = np.any(drawn != original, axis=-1)
        assert union.sum() > 50 and changed[union].mean() > 0.9


def test_draw_detections_fills_each_mask_under_the_boxes():
    """Two overlapping masks inside their boxes: the fill is the image and the class colour half
    and half, the higher score's on top, and pixels outside masks, outlines and tags keep their
    values."""
    image = np.random.RandomState(1).randint(0, 256, (120, 160, 3), np.uint8)

    def detection(index, score, box, rows, cols):
        mask = np.zeros((120, 160), np.uint8)
        mask[rows, cols] = 1
        rle = mask_util.encode(np.asfortranarray(mask))
        rle = {'size': [120, 160], 'counts': rle['counts'].decode('ascii')}
        return predict.Detection(LABELS[index], index, score, box, rle, int(mask.sum()))

    first = detection(0, 0.9, (20.0, 40.0, 100.0, 110.0), slice(50, 100), slice(30, 90))
    second = detection(1, 0.5, (60.0, 45.0, 150.0, 115.0), slice(55, 105), slice(70, 140))
    drawn = np.asarray(predict.draw_detections(image, [first, second]))

    def blend(pixels, index):  # the fill, exact in floats; the image is rounded half to even
        return (pixels.astype(np.float64) + predict.box_colour(index)) / 2

    # Regions clear of the outlines (x 20, 60, 100, 150; y 40, 45, 110, 115) and of the tags
    # (above each box's top edge).
    only_first = (slice(50, 100), slice(30, 58))
    both = (slice(55, 100), slice(70, 90))
    only_second = (slice(101, 105), slice(102, 140))
    np.testing.assert_array_equal(drawn[only_first], np.round(blend(image[only_first], 0)))
    np.testing.assert_array_equal(drawn[only_second], np.round(blend(image[only_second], 1)))
    np.testing.assert_array_equal(drawn[both], np.round(blend(blend(image[both], 1), 0)))
    for unmasked in [(slice(0, 20), slice(0, 160)), (slice(42, 50), slice(21, 59))]:
        np.testing.assert_array_equal(drawn[unmasked], image[unmasked])
    # The outline of the first box in its colour, at its left edge.
    assert np.all(drawn[60:100, 20] == predict.box_colour(0))


def test_text_output_adds_the_mask_area(json_run):
    _, results, _, _ = json_run
    result = results['big.png']
    detections = [predict.Detection(**d) for d in result['detections']]
    for detection, d in zip(detections, result['detections']):
        assert detection.to_json() == d
    lines = predict.DetectionPrediction(result['image'], result['drawn'], detections).to_text()
    lines = lines.splitlines()
    assert lines[0] == f'{result["image"]} -> {result["drawn"]}'
    for line, d in zip(lines[1:], result['detections'], strict=True):
        score, x1, y1, x2, y2, area, unit, *label = line.split()
        assert float(score) == pytest.approx(d['score'], abs=5e-4)
        np.testing.assert_allclose([float(v) for v in (x1, y1, x2, y2)], d['box'], atol=0.05 + 1e-6)
        assert (int(area), unit, ' '.join(label)) == (d['area'], 'px', d['label'])
