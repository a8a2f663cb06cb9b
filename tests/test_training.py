"""Tests of the training loop, checkpoints, evaluation and the train.py command line.

Small on purpose: a 4-stage CrossFormer of width 16 on 32x32 images of three synthetic classes.
Runs that must start a fresh JAX (8 simulated devices, signals, kill -9) go through train.py in
subprocesses that share a persistent compilation cache, so each program is compiled once.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from helpers import (
    CLASSES,
    REPO,
    TRAIN_SUBPROCESS_XLA_FLAGS,
    _assert_same_params,
    _checkpoint_steps,
    _metrics,
    _params,
    _write_image_folder,
    init_params,
)

from crossformer_jax import models, tasks
from crossformer_jax.training import optimizer, trainer

NUM_STEPS = 32

# -------------------------------------------------------------------------------------------------
# Fixtures: data, config, and one uninterrupted reference run.


CONFIG_TEMPLATE = """
from configs import digits_demo


def get_config():
    config = digits_demo.get_config()
    config.model.embed_dim = 16
    config.model.depths = (2, 1, 1, 1)
    config.model.num_heads = (1, 1, 2, 2)
    config.model.group_size = (4, 4, 4, 4)
    config.model.interval = (2, 1, 1, 1)
    config.model.drop_path_rate = 0.1
    config.model.dtype = 'float32'
    config.data.data_dir = {data_dir!r}
    config.data.hflip = True
    config.data.random_erasing_prob = 0.25
    config.data.shuffle_buffer = 64
    config.data.num_parallel_calls = 1
    config.data.prefetch = 1
    config.mixup.mixup_alpha = 0.8
    config.mixup.cutmix_alpha = 1.0
    config.batch_size = 16
    config.eval_batch_size = 8
    config.num_train_steps = {num_steps}
    config.warmup_epochs = 1
    config.lr_reference_batch = 16
    config.base_lr = 1e-3
    config.log_every_steps = 1
    config.eval_every_steps = 16
    config.checkpoint_every_steps = 4
    config.keep_checkpoints = 3
    return config
"""


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    """Data, a config file, and the environment for train.py subprocesses."""
    root = tmp_path_factory.mktemp('training')
    data_dir = str(root / 'data')
    _write_image_folder(data_dir, {'train': 16, 'validation': 4})  # 48 / 12 images
    config_path = str(root / 'tiny_config.py')
    with open(config_path, 'w') as f:
        f.write(CONFIG_TEMPLATE.format(data_dir=data_dir, num_steps=NUM_STEPS))
    sub_env = dict(os.environ)
    sub_env.update(
        {
            'PYTHONPATH': os.pathsep.join(
                [REPO] + [p for p in [os.environ.get('PYTHONPATH')] if p]
            ),
            'JAX_PLATFORMS': 'cpu',
            'JAX_COMPILATION_CACHE_DIR': str(root / 'jax_cache'),
            'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
            'TF_CPP_MIN_LOG_LEVEL': '2',
        }
    )
    sub_env['XLA_FLAGS'] = TRAIN_SUBPROCESS_XLA_FLAGS
    return {'root': root, 'data_dir': data_dir, 'config_path': config_path, 'env': sub_env}


def _command(env, workdir, *overrides, mode='train'):
    return [
        sys.executable,
        os.path.join(REPO, 'train.py'),
        '--config',
        env['config_path'],
        '--workdir',
        str(workdir),
        '--mode',
        mode,
        *overrides,
    ]


def _run(env, workdir, *overrides, devices=1, mode='train', timeout=900):
    sub_env = dict(env['env'])
    if devices > 1:
        sub_env['XLA_FLAGS'] += f' --xla_force_host_platform_device_count={devices}'
    return subprocess.run(
        _command(env, workdir, *overrides, mode=mode),
        cwd=REPO,
        env=sub_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _train_losses(workdir) -> dict[int, float]:
    return {m['step']: m['train/loss'] for m in _metrics(workdir) if 'train/loss' in m}


def _load_config_file(path):
    import importlib.util

    if REPO not in sys.path:
        sys.path.insert(0, REPO)  # config files import configs.common
    spec = importlib.util.spec_from_file_location('config_file', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _load_config(env, **changes):
    config = _load_config_file(env['config_path'])
    config.update_from_flattened_dict(changes)
    return config


@pytest.fixture(scope='module')
def reference(env):
    """NUM_STEPS uninterrupted steps on one device: the run everything else is compared with."""
    workdir = env['root'] / 'reference'
    result = _run(env, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return {'workdir': workdir, 'log': result.stderr}


# -------------------------------------------------------------------------------------------------
# Tests.


def test_training_lowers_the_loss_and_writes_the_workdir(reference):
    workdir = reference['workdir']
    losses = _train_losses(workdir)
    assert sorted(losses) == list(range(1, NUM_STEPS + 1))
    first, last = (
        np.mean([losses[s] for s in range(1, 7)]),
        np.mean([losses[s] for s in range(NUM_STEPS - 5, NUM_STEPS + 1)]),
    )
    assert last < first - 0.1, (first, last)
    assert os.path.exists(os.path.join(workdir, 'config.json'))
    assert os.listdir(os.path.join(workdir, 'tensorboard'))
    # Last N kept, and the best by validation top-1 kept separately.
    assert _checkpoint_steps(workdir) == [NUM_STEPS - 8, NUM_STEPS - 4, NUM_STEPS]
    assert len(_checkpoint_steps(workdir, 'checkpoints_best')) == 1
    evals = [m for m in _metrics(workdir) if 'eval/top1' in m]
    assert [m['step'] for m in evals] == [16, 32]
    assert 'Final validation top-1' in reference['log']
    assert 'step 32/32 | epoch' in reference['log'] and 'img/s | data wait' in reference['log']
    # the share of each logging interval spent waiting for input batches is logged
    waits = [m for m in _metrics(workdir) if 'train/data_wait_fraction' in m]
    assert len(waits) == len([m for m in _metrics(workdir) if 'train/loss' in m])
    for m in waits:
        assert 0.0 <= m['train/data_wait_fraction'] <= 1.0
        assert m['train/data_wait_seconds_per_step'] >= 0.0


# The replicated run is slow-only: the FSDP run keeps its small arrays replicated (checked below)
# and shards the batch the same way, so it covers the data-parallel step; the all-replicated
# layout of fsdp=False is checked in tests/test_sharding.py.
@pytest.mark.parametrize(
    'fsdp', [True, pytest.param(False, marks=pytest.mark.slow)], ids=['fsdp', 'replicated']
)
def test_eight_devices_match_one_device(env, reference, fsdp):
    workdir = env['root'] / f'eight_devices_{"fsdp" if fsdp else "replicated"}'
    # Same schedule and train step; fewer saves and evaluations (they cost more on 8 devices).
    # With FSDP, parameters and optimizer state are split too (the tiny model needs a low
    # threshold), which must not change the numbers either.
    result = _run(
        env,
        workdir,
        '--config.checkpoint_every_steps=1000',
        '--config.eval_every_steps=1000',
        f'--config.fsdp={fsdp}',
        '--config.fsdp_min_size=1024',
        devices=8,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'on 8 cpu device(s)' in result.stderr
    split = re.search(
        r'FSDP: (\d+) of (\d+) parameter arrays .* split over the (\d+) devices', result.stderr
    )
    if fsdp:
        assert split, result.stderr[-3000:]
        num_split, num_arrays, num_devices = map(int, split.groups())
        assert 0 < num_split < num_arrays and num_devices == 8
    else:
        assert split is None
    one, eight = _train_losses(reference['workdir']), _train_losses(workdir)
    assert sorted(eight) == sorted(one)
    np.testing.assert_allclose(
        [eight[s] for s in sorted(one)], [one[s] for s in sorted(one)], rtol=2e-4, atol=2e-4
    )
    # atol: the last DPB biases have zero gradient in exact arithmetic, so they hold rounding noise
    # that Adam scales up (measured 2.7e-5 apart after 32 steps; everything else within 1e-3).
    _assert_same_params(
        _params(workdir, NUM_STEPS), _params(reference['workdir'], NUM_STEPS), rtol=1e-3, atol=1e-4
    )


# train.py, sending itself a signal right after it has logged a given step: the signal arrives
# at a step the test chose, however fast or slow the machine, never after the run has ended.
SIGNALLING_LAUNCHER = """
import os, runpy, signal, sys

from crossformer_jax.training import trainer

signal_name, at_step, train_py = sys.argv[1], int(sys.argv[2]), sys.argv[3]
write = trainer.MetricWriter.write


def write_then_signal(self, step, scalars):
    write(self, step, scalars)
    if step == at_step and 'train/loss' in scalars:
        os.kill(os.getpid(), getattr(signal, signal_name))


trainer.MetricWriter.write = write_then_signal
sys.argv = [train_py, *sys.argv[4:]]
runpy.run_path(train_py, run_name='__main__')
"""


def _run_signalled(env, workdir, signal_name, at_step):
    """A train.py run that signals itself after logging step `at_step`: CompletedProcess."""
    launcher = env['root'] / 'signalling_launcher.py'
    launcher.write_text(SIGNALLING_LAUNCHER)
    train_py, *arguments = _command(env, workdir)[1:]
    return subprocess.run(
        [sys.executable, str(launcher), signal_name, str(at_step), train_py, *arguments],
        cwd=REPO,
        env=env['env'],
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_sigterm_then_kill_then_resume_is_exact(env, reference):
    """SIGTERM -> checkpoint + exit 0; resume; kill -9 mid-run; resume: same as uninterrupted."""
    workdir = env['root'] / 'interrupted'

    # 1. SIGTERM after step 6: saves at step 6 and exits cleanly.
    result = _run_signalled(env, workdir, 'SIGTERM', at_step=6)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Preempted: saved a checkpoint at step 6 ' in result.stderr
    preempted_at = 6
    assert _checkpoint_steps(workdir) == [4, 6]

    # 2. Resume, and kill -9 after step 22 (checkpoints every 4 steps: 16 is complete by then).
    result = _run_signalled(env, workdir, 'SIGKILL', at_step=22)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert 'Resumed from' in result.stderr and f'at step {preempted_at}.' in result.stderr
    assert max(_train_losses(workdir)) == 22
    killed_at = max(s for s in _checkpoint_steps(workdir) if s < NUM_STEPS)
    assert killed_at >= 16

    # 3. Resume to the end.
    result = _run(env, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed_at = int(result.stderr.split('Resumed from')[1].split('at step ')[1].split('.')[0])
    assert preempted_at < resumed_at < NUM_STEPS and resumed_at >= killed_at
    _assert_same_params(_params(workdir, NUM_STEPS), _params(reference['workdir'], NUM_STEPS))
    one, resumed = _train_losses(reference['workdir']), _train_losses(workdir)
    assert [resumed[s] for s in range(1, NUM_STEPS + 1)] == [
        one[s] for s in range(1, NUM_STEPS + 1)
    ]


def _resume_from(env, reference, name, step):
    """A copy of the reference workdir that holds no checkpoint after `step`."""
    workdir = env['root'] / name
    shutil.copytree(reference['workdir'], workdir)
    for later in _checkpoint_steps(workdir):
        if later > step:
            shutil.rmtree(workdir / 'checkpoints' / str(later))
    return workdir


def test_non_finite_loss_stops_and_keeps_the_checkpoints(env, reference):
    """Resume the reference run at step 24 with inputs made infinite (normalisation std 0) and
    logging every 100 steps: the loss of step 25 is NaN, found at the save of step 28, so the
    run stops with exit code 1, naming step 25, and saves nothing."""
    workdir = _resume_from(env, reference, 'diverging', NUM_STEPS - 8)
    best = _checkpoint_steps(workdir, 'checkpoints_best')
    result = _run(env, workdir, '--config.data.std=(0.0,0.0,0.0)', '--config.log_every_steps=100')
    assert result.returncode == 1, result.stderr[-3000:]
    assert f'non-finite loss nan at step {NUM_STEPS - 7}' in result.stderr
    assert 'step 25/' not in result.stderr  # nothing was logged: the save found it
    assert _checkpoint_steps(workdir) == [NUM_STEPS - 8]
    assert _checkpoint_steps(workdir, 'checkpoints_best') == best
    _assert_same_params(
        _params(workdir, NUM_STEPS - 8), _params(reference['workdir'], NUM_STEPS - 8)
    )


def test_non_finite_parameters_stop_the_run(env, reference):
    """A learning rate of 1e30 after step 24: the loss of step 25 is finite (computed before the
    update), the parameters after it overflow; the run stops naming that step and saves nothing."""
    workdir = _resume_from(env, reference, 'overflowing', NUM_STEPS - 8)
    result = _run(env, workdir, '--config.base_lr=1e30')
    assert result.returncode == 1, result.stderr[-3000:]
    assert f'non-finite parameters after step {NUM_STEPS - 7} (loss ' in result.stderr
    assert _checkpoint_steps(workdir) == [NUM_STEPS - 8]


def test_evaluate_workdir_and_converted_checkpoint(env, reference):
    from crossformer_jax.weights import pretrained

    config = _load_config(env)
    last_eval = [m for m in _metrics(reference['workdir']) if 'eval/top1' in m][-1]

    # The workdir's latest checkpoint gives the final evaluation of the run.
    config.eval_checkpoint = 'latest'
    metrics = trainer.evaluate(config, str(reference['workdir']))
    assert metrics['count'] == 3 * 4  # padded examples of the last batch are not counted
    assert metrics['top1'] == pytest.approx(last_eval['eval/top1'])
    assert metrics['loss'] == pytest.approx(last_eval['eval/loss'], rel=1e-4)

    # The same weights as a converted checkpoint directory, evaluated through init_from.
    model_dir = str(env['root'] / 'converted')
    overrides = {
        k: v
        for k, v in tasks.model_overrides(config).items()
        if k in ('embed_dim', 'depths', 'num_heads', 'group_size', 'interval')
    }
    pretrained.save_pretrained(
        model_dir,
        {'params': _params(reference['workdir'], NUM_STEPS)},
        model_name='crossformer_tiny',
        num_classes=CLASSES,
        features_only=False,
        model_overrides=overrides,
    )
    config.init_from = model_dir
    metrics = trainer.evaluate(config, None)
    assert metrics['count'] == 12
    assert metrics['top1'] == pytest.approx(last_eval['eval/top1'])
    assert metrics['loss'] == pytest.approx(last_eval['eval/loss'], rel=1e-4)

    # Fine-tuning start: a new number of classes keeps everything but a re-initialised head.
    model = trainer.create_model(config, num_classes=5)
    shapes = jax.eval_shape(lambda key: init_params(model, key, 32), jax.random.key(1))
    fresh = jax.tree.map(lambda x: np.full(x.shape, 7.0, x.dtype), shapes)
    loaded = trainer.load_pretrained_params(model_dir, fresh, tasks.get_task(config, 5))
    source = _params(reference['workdir'], NUM_STEPS)
    np.testing.assert_array_equal(loaded['norm']['scale'], source['norm']['scale'])
    np.testing.assert_array_equal(
        loaded['patch_embed']['projs_0']['kernel'], source['patch_embed']['projs_0']['kernel']
    )
    np.testing.assert_array_equal(loaded['head']['kernel'], fresh['head']['kernel'])
    assert loaded['head']['kernel'].shape == (128, 5)


def test_gradient_accumulation_matches_one_big_batch():
    import optax
    from random_weights import random_variables

    from crossformer_jax.runtime import sharding
    from crossformer_jax.tasks.classification import ClassificationTask

    model = models.create_model(
        'crossformer_tiny',
        num_classes=4,
        embed_dim=16,
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 2, 2),
        group_size=(4, 4, 4, 4),
        interval=(2, 1, 1, 1),
        drop_path_rate=0.0,
    )
    params = random_variables(model, (32, 32))['params']  # compiling model.init is slow
    tx = optax.sgd(1.0)  # the update is the gradient itself (Adam would amplify round-off)
    state = trainer.TrainState.create(params, tx)
    rng = np.random.RandomState(0)
    batch = {
        'image': rng.randint(0, 256, (8, 32, 32, 3)).astype(np.uint8),
        'label': rng.randint(0, 4, size=8).astype(np.int32),
    }
    data = ml_collections.ConfigDict(
        {'mean': (0.5, 0.5, 0.5), 'std': (0.25, 0.25, 0.25), 'random_erasing_prob': 0.5}
    )
    mixing = ml_collections.ConfigDict(
        {'mixup_alpha': 0.0, 'cutmix_alpha': 0.0, 'switch_prob': 0.5, 'label_smoothing': 0.1}
    )
    results = []
    for accum in (1, 4):
        step = jax.jit(
            lambda s, b, r, accum=accum: trainer.train_step(
                s,
                b,
                r,
                model=model,
                task=ClassificationTask(num_classes=4, mixup=mixing, data=data),
                tx=tx,
                schedule=lambda _: 1e-3,
                grad_accum_steps=accum,
                mesh=sharding.create_mesh(),
            )
        )
        results.append(step(state, batch, jax.random.key(0)))
    (one, m1), (four, m4) = results
    np.testing.assert_allclose(m1['loss'], m4['loss'], rtol=1e-5)
    np.testing.assert_allclose(m1['grad_norm'], m4['grad_norm'], rtol=1e-4)
    _assert_same_params(one.params, four.params, rtol=1e-4, atol=1e-6)
    assert int(four.step) == 1  # one optimizer step for the four micro-batches


def test_config_errors(env, tmp_path):
    config = _load_config(env)
    with pytest.raises(trainer.ConfigError, match="unknown model 'crossformer_tinyy'"):
        trainer.validate_config(
            _load_config(env, **{'model.name': 'crossformer_tinyy'}), mode='train', device_count=1
        )
    with pytest.raises(trainer.ConfigError, match=r'not divisible by the number of devices \(3\)'):
        trainer.validate_config(config, mode='train', device_count=3)
    with pytest.raises(trainer.ConfigError, match='grad_accum_steps'):
        trainer.validate_config(_load_config(env, grad_accum_steps=3), mode='train', device_count=1)
    missing = str(tmp_path / 'no_such_dir')
    with pytest.raises(trainer.ConfigError, match='does not exist'):
        trainer.train_and_evaluate(_load_config(env, **{'data.data_dir': missing}), str(tmp_path))
    with pytest.raises(trainer.ConfigError, match='unknown override'):
        trainer.validate_config(
            _load_config(env, **{'model.embed_dims': 8}), mode='train', device_count=1
        )

    # Through the command line: exit code 2 and the message, before any compilation.
    result = _run(env, tmp_path / 'cli', '--config.batch_size=12', devices=8)
    assert result.returncode == 2
    assert (
        'global batch size config.batch_size=12 is not divisible by the number of devices (8)'
        in result.stderr
    )


def test_every_config_is_valid_and_follows_the_recipe():
    import glob

    from crossformer_jax.models import crossformer

    names = []
    for path in sorted(glob.glob(os.path.join(REPO, 'configs', '*.py'))):
        if os.path.basename(path) in ('__init__.py', 'common.py'):
            continue
        config = _load_config_file(path)
        trainer.validate_config(config, mode='throughput', device_count=8)
        crossformer.model_config(config.model.name, **tasks.model_overrides(config))
        names.append(config.model.name)
    assert set(crossformer.VARIANTS) <= set(names)

    # The paper's recipe at global batch 1024: lr 1e-3 after 20 warm-up epochs from 1e-6, cosine
    # down to 1e-5 at epoch 300; drop-path rate per variant.
    config = _load_config_file(os.path.join(REPO, 'configs', 'crossformer_base.py'))
    steps_per_epoch = 1281167 // 1024
    total = 300 * steps_per_epoch
    schedule = optimizer.create_learning_rate_schedule(config, steps_per_epoch, total)
    np.testing.assert_allclose(
        [schedule(0), schedule(20 * steps_per_epoch), schedule(total)],
        [1e-6, 1e-3, 1e-5],
        rtol=1e-4,
    )
    assert config.model.drop_path_rate == 0.3 and config.weight_decay == 0.05
    assert config.grad_clip_norm == 5.0 and config.model.dtype == 'bfloat16'
    mask = optimizer.decay_mask(
        {'dense': {'kernel': np.zeros((2, 2)), 'bias': np.zeros(2)}, 'norm': {'scale': np.zeros(2)}}
    )
    assert mask == {'dense': {'kernel': True, 'bias': False}, 'norm': {'scale': False}}
