"""`train.py --mode compile`: the train and evaluation steps compiled ahead of time for a TPU
slice described by libtpu (no TPU here), with the memory and FLOPs they report."""

import json
import subprocess
import sys

import pytest
from helpers import REPO, needs_cpu_plugin

from configs import digits_demo
from configs.detection import demo as detection_demo
from configs.segmentation import digits_demo as segmentation_digits_demo
from crossformer_jax import cpu
from crossformer_jax.cpu import kernels
from crossformer_jax.models import complexity
from crossformer_jax.training import aot

TOPOLOGY = 'v5e:2x2'
PLUGIN_TARGETS = (
    kernels.MATMUL_TARGET,
    kernels.ATTENTION_FORWARD,
    kernels.ATTENTION_BACKWARD,
    kernels.LAYER_NORM_FORWARD,
    kernels.LAYER_NORM_BACKWARD,
    kernels.CONV_FORWARD,
    kernels.CONV_KERNEL_GRADIENT,
)


def test_topologies_are_described_with_their_chips():
    topology = aot.describe_topology(TOPOLOGY)
    assert len(topology.devices) == 4 and topology.device_kind == 'TPU v5 lite'
    assert topology.hbm_bytes_per_device == 16 * 2**30
    assert aot.describe_topology('v6e:2x4').hbm_bytes_per_device == 32 * 2**30
    with pytest.raises(aot.TopologyError, match=r"unknown topology 'v9x:2x2'.*v5e:2x2"):
        aot.describe_topology('v9x:2x2')


def test_a_missing_tpu_compiler_names_the_extra(monkeypatch):
    from jax.experimental import topologies

    def no_libtpu(**kwargs):
        raise RuntimeError('Unable to initialize backend: no libtpu')

    monkeypatch.setattr(topologies, 'get_topology_desc', no_libtpu)
    with pytest.raises(aot.TopologyError, match=r"pip install 'crossformer_jax\[tpu\]'"):
        aot.describe_topology(TOPOLOGY)


@needs_cpu_plugin
def test_classification_with_fsdp_compiles_plain_and_fits():
    """With the CPU plug-in enabled in the process, the TPU programs still hold no custom call;
    the train step's FLOPs are about 3 x the forward's 2 x count_macs per image."""
    config = digits_demo.get_config()
    config.fsdp = True
    config.fsdp_min_size = 1
    assert cpu.enable(strict=True)
    reports, texts = aot.compile_config(config, aot.describe_topology(TOPOLOGY))
    assert [r.name for r in reports] == ['train_step', 'eval_step'] and all(r.fits for r in reports)
    for text in texts.values():
        assert 'HloModule' in text and not any(target in text for target in PLUGIN_TARGETS)
    # XLA's cost model against the analytic count: the narrow demo model's forward at 32x32 came
    # to 0.913 x 2 x count_macs per image, and a train step (forward, backward, the augmentation,
    # whose per-image loop the cost model counts once, and AdamW) to 0.976 x 3 forwards.
    forward = aot.model_flops_per_image(config)
    assert forward == 2 * complexity.model_macs(
        'crossformer_tiny', 32, 1000, **digits_overrides(config)
    )
    train, evaluate = reports
    assert evaluate.flops_per_image / forward == pytest.approx(1.0, abs=0.1)
    assert train.flops_per_image / (3 * evaluate.flops_per_image) == pytest.approx(1.0, abs=0.05)
    assert 0 < train.argument_bytes < train.peak_bytes < 2**30


def digits_overrides(config):
    return {k: v for k, v in config.model.to_dict().items() if k != 'name'}


def compile_command(*args):
    return subprocess.run(
        [sys.executable, 'train.py', '--mode', 'compile', '--compilation_cache_dir=', *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_command_exits_1_naming_the_program_that_does_not_fit():
    result = compile_command(
        '--config',
        'configs/digits_demo.py',
        '--topology',
        TOPOLOGY,
        '--config.eval_batch_size=16777216',
    )
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary['topology'] == TOPOLOGY and summary['num_devices'] == 4
    assert summary['fits'] is False
    fits = {p['name']: p['fits'] for p in summary['programs']}
    assert fits == {'train_step': True, 'eval_step': False}
    assert any(
        line.startswith('error: eval_step needs') and 'GiB more than the 16 GiB' in line
        for line in lines
    ), result.stdout


def test_command_exits_2_for_a_topology_it_cannot_describe():
    result = compile_command('--config', 'configs/digits_demo.py', '--topology', 'v9x:2x2')
    assert result.returncode == 2
    assert "unknown topology 'v9x:2x2'" in result.stderr


@pytest.mark.slow
def test_segmentation_compiles_and_fits():
    config = segmentation_digits_demo.get_config()
    reports, _ = aot.compile_config(config, aot.describe_topology(TOPOLOGY))
    assert all(r.fits for r in reports)


@pytest.mark.slow
def test_detection_compiles_and_fits():
    """The RetinaNet demo config on its landscape canvas: train step (normalisation, focal and L1
    losses with anchor assignment, AdamW) and evaluation step (detect's top-k and NMS loop)."""
    config = detection_demo.get_config()
    reports, texts = aot.compile_config(config, aot.describe_topology(TOPOLOGY))
    assert [r.name for r in reports] == ['train_step', 'eval_step'] and all(r.fits for r in reports)
    assert 'while' in texts['eval_step']  # the NMS loop stays a loop on the device
    forward = aot.model_flops_per_image(config)
    assert forward == 2 * complexity.model_macs(
        'retinanet_crossformer_small', (128, 160), 80, **digits_overrides(config)
    )
