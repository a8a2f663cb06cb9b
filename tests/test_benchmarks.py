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
            '--rounds',
            '2',
            '--warmup',
            '0',
            '--threads',
            '1',
            '--overrides',
            TINY,
        ]
    )
    span = rf'{NUMBER} \[{NUMBER}-{NUMBER}\]'
    for mode in ('inference', 'train'):
        pattern = rf'^crossformer_tiny\s+{mode}\s+2\s+{span}\s+{span}\s+{span}x\s+{NUMBER}$'
        assert re.search(pattern, out, re.MULTILINE), (pattern, out)


def test_accelerator_benchmark_imports_no_tensorflow():
    code = (
        'import sys\n'
        'import crossformer_jax.complexity, crossformer_jax.crossformer\n'
        'import crossformer_jax.torch_reference\n'
        'sys.path.insert(0, "benchmarks")\n'
        'import accelerator_benchmark\n'
        'print(sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow"))\n'
    )
    assert run_script(['-c', code]).strip() == '[]'
