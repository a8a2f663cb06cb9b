"""The benchmark scripts run end to end on CPU with a tiny model and print a table of numbers."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = json.dumps({'embed_dim': 16, 'depths': [1, 1, 1, 1], 'num_heads': [1, 2, 4, 8]})
NUMBER = r'\d+\.\d+'
# The interleaving benchmarks' smoke settings: two timed rounds on one CPU, the tiny config.
INTERLEAVED_SMOKE = ['--rounds', '2', '--warmup', '0', '--threads', '1', '--overrides', TINY]


def run_script(args: list[str]) -> str:
    # The smoke runs check the scripts' plumbing and tables, not speed: XLA compiles the tiny
    # programs without LLVM optimization, in about half the time.
    env = {
        **os.environ,
        'PYTHONPATH': ROOT,
        'JAX_PLATFORMS': 'cpu',
        'XLA_FLAGS': '--xla_backend_optimization_level=0',
    }
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=420
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.timeout(480)
def test_accelerator_benchmark_tiny_on_cpu(tmp_path):
    out = run_script(
        [
            'benchmarks/accelerator_benchmark.py',
            '--model',
            'crossformer_tiny',
            '--batch',
            '2',
            '--image-size',
            '64',
            '--steps',
            '1',
            '--warmup',
            '0',
            '--no-torch-compile',
            '--remat',
            'on',
            '--dtype',
            'float32',
            '--overrides',
            TINY,
            '--json',
            str(tmp_path / 'rows.json'),
        ]
    )
    for framework, mode, remat in [
        ('torch amp', 'train', '-'),
        ('torch amp', 'inference', '-'),
        ('flax', 'train', 'on'),
        ('flax', 'inference', '-'),
    ]:
        pattern = rf'^{framework}\s+crossformer_tiny\s+{mode}\s+{re.escape(remat)}\s+2\s+{NUMBER}'
        assert re.search(pattern + rf'\s+{NUMBER}', out, re.MULTILINE), (pattern, out)
    rows = json.loads((tmp_path / 'rows.json').read_text())['rows']
    assert len(rows) == 4
    assert all(row['images_per_s'] > 0 and row['mfu_percent'] is None for row in rows)


@pytest.mark.timeout(480)
def test_cpu_benchmark_tiny_interleaved():
    out = run_script(
        [
            'benchmarks/cpu_benchmark.py',
            '--image-size',
            '64',
            '--inference-batch',
            '2',
            '--train-batch',
            '2',
            *INTERLEAVED_SMOKE,
        ]
    )
    span = rf'{NUMBER} \[{NUMBER}-{NUMBER}\]'
    for mode in ('inference', 'train'):
        pattern = rf'^crossformer_tiny\s+{mode}\s+2\s+{span}\s+{span}\s+{span}x\s+{NUMBER}$'
        assert re.search(pattern, out, re.MULTILINE), (pattern, out)


def test_accelerator_benchmark_imports_no_tensorflow():
    code = (
        'import sys\n'
        'import crossformer_jax.models.complexity, crossformer_jax.models.crossformer\n'
        'import crossformer_jax.reference.crossformer\n'
        'sys.path.insert(0, "benchmarks")\n'
        'import accelerator_benchmark\n'
        'print(sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow"))\n'
    )
    assert run_script(['-c', code]).strip() == '[]'


@pytest.mark.timeout(300)
def test_input_pipeline_benchmark_rows_and_ratio(tmp_path):
    out = run_script(
        [
            'benchmarks/input_pipeline.py',
            '--cores',
            '1',
            '--images',
            '16',
            '--batch-size',
            '4',
            '--batches',
            '1',
            '--rounds',
            '2',
            '--make-dir',
            str(tmp_path / 'folder'),
        ]
    )
    rows = {
        'decode only': True,
        r'\+ crop/flip \(host part of the full recipe\)': True,
        r'device: \+ RandAugment \(JAX, same cores\)': True,
        r'device: \+ erasing \(device part of the full recipe\)': True,
        r'original loader, full recipe \(1 worker processes\)': False,
        r'eval \(resize \+ centre crop\)': True,
    }
    for row, timed_here in rows.items():
        per_cpu = r'\d+' if timed_here else '-'
        pattern = rf'^\| {row} \| \d+ \| \d+-\d+ \| {per_cpu} \|$'
        assert re.search(pattern, out, re.MULTILINE), (pattern, out)
    pattern = rf'^host pipeline / original loader, per round: {NUMBER}x \[{NUMBER}-{NUMBER}\]$'
    assert re.search(pattern, out, re.MULTILINE), out
    assert len(os.listdir(tmp_path / 'folder' / 'train' / 'class0')) == 8


def test_reference_loader_batches_follow_the_recipe(tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from benchmarks import reference_loader as ref

    rng = np.random.RandomState(0)
    files = []
    for i in range(4):
        path = str(tmp_path / f'{i}.png')
        Image.fromarray(rng.randint(0, 256, (40, 60, 3)).astype(np.uint8)).save(path)
        files.append((path, i % 2))
    loader = ref.reference_loader(files, batch_size=4, workers=0, size=32)
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert sorted(labels.tolist()) == [0, 0, 1, 1]
    # prob 0 leaves the image alone; an op at level 1 changes it
    image = Image.open(files[0][0]).convert('RGB')
    assert ref.randaugment(image, prob=0.0) is image
    inverted = ref._apply('Invert', image, 1.0)
    np.testing.assert_array_equal(np.asarray(inverted), 255 - np.asarray(image))
    # a crop of the whole square image resized to its own size is the image
    square = image.crop((0, 0, 40, 40))
    same = ref.random_resized_crop(square, 40, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_array_equal(np.asarray(same), np.asarray(square))
    # erasing: prob 1 writes one rectangle of noise, prob 0 nothing
    x = torch.zeros(3, 32, 32)
    assert ref.random_erasing(x.clone(), prob=0.0).count_nonzero() == 0
    erased = ref.random_erasing(x.clone(), prob=1.0)
    changed = erased.abs().sum(0) > 0
    rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
    area = len(rows) * len(cols)
    assert changed.sum() == area and 0.02 * 1024 * 0.5 <= area <= 1024 / 3 * 1.5


def test_matmul_benchmark_shapes_follow_the_variant():
    from benchmarks.matmul_benchmark import dense_layers
    from crossformer_jax.models.crossformer import model_config

    layers = dense_layers(model_config('crossformer_small'), batch=16, image_size=224)
    assert len(layers) == 16
    by_name = {(layer['stage'], layer['layer']): layer for layer in layers}
    assert by_name[0, 'qkv'] == {
        'stage': 0,
        'layer': 'qkv',
        'depth': 2,
        'm': 50176,
        'k': 96,
        'n': 288,
    }
    assert by_name[0, 'fc2'] == {
        'stage': 0,
        'layer': 'fc2',
        'depth': 2,
        'm': 50176,
        'k': 384,
        'n': 96,
    }
    assert by_name[2, 'fc1'] == {
        'stage': 2,
        'layer': 'fc1',
        'depth': 6,
        'm': 3136,
        'k': 384,
        'n': 1536,
    }
    assert by_name[3, 'proj'] == {
        'stage': 3,
        'layer': 'proj',
        'depth': 2,
        'm': 784,
        'k': 768,
        'n': 768,
    }


@pytest.mark.timeout(300)
def test_matmul_benchmark_tiny_prints_every_product(tmp_path):
    out = run_script(
        [
            'benchmarks/matmul_benchmark.py',
            '--model',
            'crossformer_tiny',
            '--batch',
            '1',
            '--image-size',
            '64',
            *INTERLEAVED_SMOKE,
            '--json',
            str(tmp_path / 'rows.json'),
        ]
    )
    span = rf'{NUMBER} \[{NUMBER}-{NUMBER}\]x'
    for product in ('forward', 'input grad', 'kernel grad'):
        # stage 0 of the tiny config: 16 x 16 tokens, C = 16, fc1 16 -> 64
        pattern = rf'^0\s+fc1\s+{product}\s+256x16x64\s+\d+\s+\d+\s+{span}$'
        assert re.search(pattern, out, re.MULTILINE), (pattern, out)
    assert re.search(rf'XLA {NUMBER} s, PyTorch {NUMBER} s$', out, re.MULTILINE), out
    rows = json.loads((tmp_path / 'rows.json').read_text())['rows']
    assert len(rows) == 4 * 4 * 3
    assert all(row['xla']['median'] > 0 and row['pytorch']['median'] > 0 for row in rows)


def test_conv_benchmark_shapes_follow_the_variant():
    import jax.numpy as jnp

    from benchmarks.conv_benchmark import conv_shapes
    from crossformer_jax import cpu
    from crossformer_jax.models import create_model

    images = jnp.zeros((2, 224, 224, 3), jnp.float32)
    assert cpu.enable(strict=True)  # the shapes are read from the plug-in's custom calls
    # crossformer_small: the first embedding's overlapping kernels (the 4x4 one is a patch
    # product), then each merge's 4x4 kernel, stride 2 (its 2x2 one is a patch product).
    assert conv_shapes(create_model('crossformer_small'), images) == [
        ((2, 224, 224, 3), (8, 8, 3, 24), 4, 2),
        ((2, 224, 224, 3), (16, 16, 3, 12), 4, 6),
        ((2, 224, 224, 3), (32, 32, 3, 12), 4, 14),
        ((2, 56, 56, 96), (4, 4, 96, 96), 2, 1),
        ((2, 28, 28, 192), (4, 4, 192, 192), 2, 1),
        ((2, 14, 14, 384), (4, 4, 384, 384), 2, 1),
    ]


@pytest.mark.timeout(300)
def test_conv_benchmark_against_the_same_source():
    out = run_script(
        [
            'benchmarks/conv_benchmark.py',
            '--against',
            'crossformer_jax/cpu/kernels.cc',
            '--batch',
            '1',
            '--image-size',
            '64',
            *INTERLEAVED_SMOKE,
        ]
    )
    span = rf'{NUMBER} \[{NUMBER}-{NUMBER}\]x'
    rows = re.findall(
        rf'^\(.*\)\s+\d+\s+\d+\s+(forward|kgrad)\s+{NUMBER}\s+{NUMBER}\s+{span}'
        r'\s+(\S+)$',
        out,
        re.MULTILINE,
    )
    # The tiny config's embedding (8x8, 16x16, 32x32 kernels) and three merges, two passes each;
    # the same source gives the same numbers.
    assert len(rows) == 12, out
    assert all(float(difference) == 0.0 for _, difference in rows), out


@pytest.mark.timeout(300)
def test_ab_benchmark_same_code_gives_the_same_gradients():
    model_file = 'crossformer_jax/models/crossformer.py'
    out = run_script(
        [
            'benchmarks/ab_benchmark.py',
            *('--a', model_file, '--b', model_file, '--mode', 'train'),
            *('--batch', '2', '--image-size', '64'),
            *INTERLEAVED_SMOKE,
        ]
    )
    span = rf'{NUMBER} \[{NUMBER}-{NUMBER}\]'
    for side in 'AB':
        assert re.search(rf'^{side}: {span} img/s, compile {NUMBER} s$', out, re.MULTILINE), out
    assert re.search(rf'^B/A speed: {span}x   per round: {NUMBER} {NUMBER}$', out, re.MULTILINE)
    # Two imports of one model file compute the same loss and gradients, bit for bit.
    assert re.search(r'^largest relative difference A vs B: 0\.00e\+00 \(', out, re.MULTILINE), out


def test_ab_benchmark_loads_a_git_revision_of_the_model_code():
    from benchmarks.ab_benchmark import load_model_module

    module = load_model_module('HEAD', 'crossformer_at_head')
    assert callable(module.build_classifier) and 'crossformer_small' in module.VARIANTS
    with pytest.raises(
        SystemExit, match=r"'no-such-revision' is neither a file nor a git revision"
    ):
        load_model_module('no-such-revision', 'crossformer_nowhere')
