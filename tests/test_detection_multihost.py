"""Detection on two processes (loopback, 2 simulated CPU devices each, one 4-device mesh): each
process loads its slots of the same global COCO batches, and the evaluation scores the
detections of every host's images. The final AP of the two-process run must equal that of
evaluating its last checkpoint in a single process."""

from __future__ import annotations

import os
import re
import sys

import pytest
from helpers import REPO, TRAIN_SUBPROCESS_XLA_FLAGS, _metrics, demo_writer
from test_multihost import CACHING_TRAIN_SCRIPT, TwoProcesses

CONFIG = """
from configs.detection import demo


def get_config():
    config = demo.get_config()
    config.model.embed_dim = 16
    config.model.fpn_channels = 16
    config.model.head_channels = 16
    config.model.num_head_convs = 1
    config.data.data_dir = {data_dir!r}
    config.data.num_parallel_calls = 1
    config.data.prefetch = 1
    config.batch_size = 8
    config.eval_batch_size = 4
    config.num_train_steps = 40
    config.warmup_steps = 5
    config.base_lr = 3e-3
    config.log_every_steps = 10
    config.eval_every_steps = 40
    config.checkpoint_every_steps = 40
    config.keep_checkpoints = 1
    return config
"""


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp('detection_multihost')
    write = demo_writer('make_detection_demo', 'write_detection_demo')
    write(str(root / 'data'), num_train=16, num_val=10)
    config_path = root / 'config.py'
    config_path.write_text(CONFIG.format(data_dir=str(root / 'data')))
    launcher = root / 'train_caching.py'
    launcher.write_text(CACHING_TRAIN_SCRIPT)
    sub_env = {k: v for k, v in os.environ.items() if not k.startswith(('JAX_', 'SLURM_', 'OMPI_'))}
    sub_env.update(
        {
            'PYTHONPATH': REPO,
            'JAX_PLATFORMS': 'cpu',
            'JAX_COMPILATION_CACHE_DIR': str(root / 'jax_cache'),
            'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
            'TF_CPP_MIN_LOG_LEVEL': '2',
            'XLA_FLAGS': f'--xla_force_host_platform_device_count=2 {TRAIN_SUBPROCESS_XLA_FLAGS}',
        }
    )
    return {
        'root': root,
        'config_path': str(config_path),
        'launcher': str(launcher),
        'env': sub_env,
    }


def _final_line(log: str) -> str:
    lines = [line for line in log.splitlines() if 'Final validation box AP' in line]
    assert lines, log[-3000:]
    return re.sub(r'^.*Final validation ', '', lines[-1])


@pytest.mark.timeout(900)
def test_two_hosts_train_and_score_every_image(env):
    import subprocess

    workdir = env['root'] / 'run'
    run = TwoProcesses(env, workdir, 'train')
    try:
        codes = run.wait()
    finally:
        run.kill()
    assert codes == [0, 0], f'exit codes {codes}\n{run.log(0)[-3000:]}\n{run.log(1)[-3000:]}'
    # Process 0 logs the scores, over the 10 validation images of both hosts.
    final = _final_line(run.log(0))
    assert '| 10 images after 40 steps.' in final
    ap50 = float(re.search(r'AP50 ([0-9.]+)', final).group(1))
    assert ap50 > 0  # boxes were found: the comparison below is not one of empty results
    losses = [m['train/loss'] for m in _metrics(workdir) if 'train/loss' in m]
    assert len(losses) == 4

    # One process with the 4 devices evaluates the last checkpoint to the same numbers.
    single_env = dict(env['env'])
    single_env['XLA_FLAGS'] = single_env['XLA_FLAGS'].replace('device_count=2', 'device_count=4')
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, 'train.py'),
            '--config',
            env['config_path'],
            '--workdir',
            str(workdir),
            '--mode',
            'evaluate',
            '--config.eval_checkpoint=latest',
        ],
        cwd=REPO,
        env=single_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    scores = re.search(r'Validation (box AP .*images)', result.stdout + result.stderr).group(1)
    assert final.startswith(scores), (final, scores)
