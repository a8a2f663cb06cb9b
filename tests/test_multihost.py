"""Multi-process training: two processes on loopback, each with 2 simulated CPU devices, run
train.py together (4 devices, one mesh) on a tiny image folder.

Process 0 gets the distributed set-up from the command-line flags, process 1 from the JAX_*
environment variables, so both ways are exercised. Every subprocess is bounded by a timeout and
killed in a `finally`. Every run splits the larger parameters and their optimizer moments over
the 4 devices (FSDP) and keeps the small ones replicated, so both layouts go through the
multi-process saves and restores (test_training checks that FSDP does not change the numbers).

Each process reads only its own shard of the training set, shuffled and augmented with its
process index (input pipeline), so the global batches of a two-process run differ by design from
those of a single process with 4 devices. The reference is therefore an uninterrupted two-process
run, which the interrupted ones must reproduce exactly. It compiles every program once; the
later runs load them from a persistent compilation cache shared by the module's runs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import (
    REPO,
    TRAIN_SUBPROCESS_XLA_FLAGS,
    _assert_same_params,
    _checkpoint_steps,
    _metrics,
    _params,
    _write_image_folder,
)

from crossformer_jax.runtime import distributed

NUM_STEPS = 8
EVERY = 4  # evaluation, best and periodic checkpoints all fall on steps 4 and 8
HEARTBEAT_S = 10  # --heartbeat_timeout of the runs
KILL_SLACK_S = 10  # a lost peer stops the other process within HEARTBEAT_S + this (README)
# JAX's preemption listener checks once a second whether SIGTERM has arrived: how long process 1
# is held stopped while process 0 posts the notice.
PREEMPTION_NOTICE_S = 3
RUN_TIMEOUT_S = 600  # a bound for loaded machines; a run takes seconds once compiled

CONFIG_TEMPLATE = """
from configs import digits_demo


def get_config():
    config = digits_demo.get_config()
    config.model.embed_dim = 16
    config.model.depths = (1, 1, 1, 1)
    config.model.num_heads = (1, 1, 2, 2)
    config.model.drop_path_rate = 0.1
    config.data.data_dir = {data_dir!r}
    config.data.shuffle_buffer = 32
    config.data.num_parallel_calls = 1
    config.data.prefetch = 1
    config.mixup.mixup_alpha = 0.8
    config.batch_size = 8
    config.eval_batch_size = 8
    config.num_train_steps = {num_steps}
    config.warmup_epochs = 1
    config.lr_reference_batch = 8
    config.log_every_steps = 1
    config.eval_every_steps = {every}
    config.checkpoint_every_steps = {every}
    config.keep_checkpoints = 2
    config.fsdp = True
    config.fsdp_min_size = 256
    return config
"""


# train.py with every process writing its compiled programs to the persistent compilation cache.
# JAX writes the cache from process 0 only, and on CPU each process's cache keys differ (they hash
# the process's own topology), so otherwise process 1 would compile everything again in every run
# while process 0 loads it, and wait for process 1 at its first collective for longer than gloo
# allows (30 s) on a loaded machine. With both writing, both load everything in later runs.
CACHING_TRAIN_SCRIPT = """
import runpy
import sys

from jax._src import compilation_cache, compiler, distributed

write_from_process_0 = compiler._cache_write


def write_from_every_process(key, compile_time_s, module_name, backend, executable, callbacks):
    if distributed.global_state.process_id == 0 or callbacks:
        write_from_process_0(key, compile_time_s, module_name, backend, executable, callbacks)
    else:
        compilation_cache.put_executable_and_time(
            key, module_name, executable, backend, int(compile_time_s)
        )


compiler._cache_write = write_from_every_process
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    """Data (3 classes, 24 training / 6 validation images), a config file, the train.py launcher
    and the subprocesses' environment (one compilation cache for the module)."""
    root = tmp_path_factory.mktemp('multihost')
    data_dir = str(root / 'data')
    _write_image_folder(data_dir, {'train': 8, 'validation': 2})
    config_path = str(root / 'config.py')
    with open(config_path, 'w') as f:
        f.write(CONFIG_TEMPLATE.format(data_dir=data_dir, num_steps=NUM_STEPS, every=EVERY))
    launcher = root / 'train_caching.py'
    launcher.write_text(CACHING_TRAIN_SCRIPT)
    # Nothing that would make JAX auto-detect another cluster.
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
    return {'root': root, 'config_path': config_path, 'launcher': str(launcher), 'env': sub_env}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class TwoProcesses:
    """train.py as processes 0 and 1 of one run; logs in WORKDIR.<tag>.<i>.log."""

    def __init__(self, env, workdir, tag, *overrides):
        address = f'127.0.0.1:{_free_port()}'
        command = [
            sys.executable,
            env['launcher'],
            os.path.join(REPO, 'train.py'),
            '--config',
            env['config_path'],
            '--workdir',
            str(workdir),
            f'--heartbeat_timeout={HEARTBEAT_S}',
            *overrides,
        ]
        self.log_paths = [f'{workdir}.{tag}.{i}.log' for i in range(2)]
        self.processes = []
        try:
            for i, log_path in enumerate(self.log_paths):
                sub_env = dict(env['env'])
                if i == 0:
                    args = [
                        f'--coordinator_address={address}',
                        '--num_processes=2',
                        '--process_id=0',
                    ]
                else:
                    args = []
                    sub_env.update(
                        JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES='2', JAX_PROCESS_ID='1'
                    )
                with open(log_path, 'w') as log:
                    self.processes.append(
                        subprocess.Popen(
                            command + args,
                            cwd=REPO,
                            env=sub_env,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                        )
                    )
        except BaseException:
            self.kill()
            raise

    def wait(self, timeout=RUN_TIMEOUT_S) -> list[int]:
        deadline = time.time() + timeout
        return [p.wait(timeout=max(deadline - time.time(), 1)) for p in self.processes]

    def log(self, i=0) -> str:
        with open(self.log_paths[i]) as f:
            return f.read()

    def kill(self):
        for p in self.processes:
            if p.poll() is None:
                p.kill()
                p.wait()


def _run(env, workdir, tag, *overrides) -> TwoProcesses:
    """Runs both processes to the end; asserts both exit 0."""
    run = TwoProcesses(env, workdir, tag, *overrides)
    try:
        codes = run.wait()
    finally:
        run.kill()
    assert codes == [0, 0], f'exit codes {codes}\n{run.log(0)[-3000:]}\n{run.log(1)[-3000:]}'
    return run


def _wait_for(condition, run: TwoProcesses, what: str, timeout=RUN_TIMEOUT_S):
    deadline = time.time() + timeout
    while not condition():
        codes = [p.poll() for p in run.processes]
        assert codes == [None, None], f'a process ended ({codes}) before {what}'
        assert time.time() < deadline, f'timed out waiting for {what}'
        time.sleep(0.01)


def _last_logged_step(workdir) -> int:
    return max((m['step'] for m in _metrics(workdir) if 'train/loss' in m), default=0)


def _assert_complete(workdir, sub):
    """Every step directory is a finished orbax checkpoint (no temporary leftovers)."""
    path = os.path.join(workdir, sub)
    leftovers = [d for d in os.listdir(path) if not d.isdigit()]
    assert not leftovers, leftovers
    for step in _checkpoint_steps(workdir, sub):
        assert os.path.exists(os.path.join(path, str(step), '_CHECKPOINT_METADATA')), (sub, step)


# Both managers save every step, with asynchronous writes still running when the next save
# starts: without distinct barrier names the second process fails with 'Barrier
# _async_write_complete.N is already ongoing' and both hang.
CHECKPOINT_SCRIPT = """
import sys

import jax
import numpy as np

from crossformer_jax.training import checkpointing
from crossformer_jax.runtime import distributed
from crossformer_jax.runtime import sharding

process_id, address, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
distributed.initialize(distributed.Setup(address, 2, process_id), heartbeat_timeout_s=10)
mesh = sharding.create_mesh()
weights = jax.device_put(np.arange(8.0, dtype=np.float32), sharding.batch_sharding(mesh))
checkpoints = checkpointing.Checkpoints(workdir, keep=2, best_metric='miou')
for step in range(1, 7):
    state = {'w': weights + step}
    assert checkpoints.save_if_best(step, state, {'miou': step / 10, 'loss': 1.0}), step
    assert checkpoints.save(step, state), step
checkpoints.wait()
checkpoints.close()
"""


@pytest.mark.timeout(300)
def test_latest_and_best_saves_of_the_same_steps_do_not_collide(env, tmp_path):
    import orbax.checkpoint as ocp

    script = tmp_path / 'save_both.py'
    script.write_text(CHECKPOINT_SCRIPT)
    address = f'127.0.0.1:{_free_port()}'
    workdir = tmp_path / 'workdir'
    processes = []
    try:
        for i in range(2):
            processes.append(
                subprocess.Popen(
                    [sys.executable, str(script), str(i), address, str(workdir)],
                    cwd=REPO,
                    env=env['env'],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        outputs = [p.communicate(timeout=240)[0] for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in processes] == [0, 0], '\n'.join(o[-3000:] for o in outputs)
    assert _checkpoint_steps(workdir) == [5, 6]
    assert _checkpoint_steps(workdir, 'checkpoints_best') == [6]
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {'w': jax.ShapeDtypeStruct((8,), np.float32, sharding=device)}
    for sub in ('checkpoints', 'checkpoints_best'):
        _assert_complete(workdir, sub)
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(workdir / sub / '6' / 'default', target)
        assert restored['w'].tolist() == [float(i + 6) for i in range(8)]


@pytest.fixture(scope='module')
def reference(env):
    """An uninterrupted two-process run where evaluation, the best checkpoint and the periodic
    checkpoint fall on the same steps (4 and 8): the collision that used to kill the run."""
    workdir = env['root'] / 'reference'
    run = _run(env, workdir, 'run')
    return {'workdir': workdir, 'log': run.log(0)}


@pytest.mark.timeout(1200)
def test_colliding_saves_complete_and_evaluate_everything(reference):
    workdir = reference['workdir']
    assert 'on 4 cpu device(s) in 2 process(es)' in reference['log']
    assert ' are split over the 4 devices' in reference['log']  # FSDP
    assert _checkpoint_steps(workdir) == [EVERY, NUM_STEPS]
    _assert_complete(workdir, 'checkpoints')
    best = _checkpoint_steps(workdir, 'checkpoints_best')
    assert len(best) == 1 and best[0] in (EVERY, NUM_STEPS)
    _assert_complete(workdir, 'checkpoints_best')
    evals = [m for m in _metrics(workdir) if 'eval/top1' in m]
    assert [m['step'] for m in evals] == [EVERY, NUM_STEPS]
    with open(os.path.join(workdir, 'checkpoints_best', str(best[0]), 'metrics', 'metrics')) as f:
        assert json.load(f)['top1'] == max(m['eval/top1'] for m in evals)
    # The two processes' shards together are the whole validation set, each image counted once.
    assert f'| {3 * 2} images' in reference['log']
    assert 'Final validation top-1' in reference['log']


@pytest.mark.timeout(1800)
def test_sigterm_then_kill_then_resume_is_exact(env, reference):
    """SIGTERM both -> checkpoint, exit 0; resume, kill -9 process 0 -> process 1 exits non-zero
    within the heartbeat bound; resume again -> the reference's parameters, bit for bit."""
    workdir = env['root'] / 'interrupted'

    # 1. SIGTERM to both once step 1 is logged. Every step needs both processes, so holding
    # process 1 stopped holds both; meanwhile process 0 notices its SIGTERM and posts the notice.
    # When process 1 goes on, both agree at once on the next step as the stop step, far from the
    # end: the preemption cannot race the end of the run.
    run = TwoProcesses(env, workdir, 'sigterm')
    first, second = run.processes
    try:
        _wait_for(lambda: _last_logged_step(workdir) >= 1, run, 'step 1')
        second.send_signal(signal.SIGSTOP)
        first.send_signal(signal.SIGTERM)
        second.send_signal(signal.SIGTERM)  # delivered when it goes on
        time.sleep(PREEMPTION_NOTICE_S)
        second.send_signal(signal.SIGCONT)
        codes = run.wait()
    finally:
        second.send_signal(signal.SIGCONT)
        run.kill()
    assert codes == [0, 0], f'{codes}\n{run.log(0)[-3000:]}\n{run.log(1)[-3000:]}'
    assert 'Preempted: saved a checkpoint at step' in run.log(0), run.log(0)[-3000:]
    preempted_at = _checkpoint_steps(workdir)[-1]
    assert 1 <= preempted_at < NUM_STEPS - 1
    _assert_complete(workdir, 'checkpoints')

    # 2. Resume; once a later checkpoint is complete, kill -9 process 0 (it hosts the
    # coordination service) and time how long process 1 takes to give up. A checkpoint every
    # step, so that one lands before the end wherever the preemption fell.
    run = TwoProcesses(env, workdir, 'kill', '--config.checkpoint_every_steps=1')
    try:
        _wait_for(
            lambda: any(preempted_at < s < NUM_STEPS for s in _checkpoint_steps(workdir)),
            run,
            'a checkpoint after the resumed step',
        )
        killed_time = time.time()
        run.processes[0].kill()
        survivor_code = run.processes[1].wait(timeout=HEARTBEAT_S + KILL_SLACK_S + 30)
        survivor_seconds = time.time() - killed_time
    finally:
        run.kill()
    assert survivor_code != 0
    assert survivor_seconds < HEARTBEAT_S + KILL_SLACK_S, survivor_seconds
    assert f'at step {preempted_at}.' in run.log(0)
    killed_after = max(s for s in _checkpoint_steps(workdir) if s < NUM_STEPS)

    # 3. The same command again: resumes from the last complete checkpoint and finishes with the
    # reference's parameters and losses.
    run = _run(env, workdir, 'resume')
    resumed_at = int(run.log(0).split('Resumed from')[1].split('at step ')[1].split('.')[0])
    assert killed_after <= resumed_at < NUM_STEPS
    _assert_same_params(_params(workdir, NUM_STEPS), _params(reference['workdir'], NUM_STEPS))
    reference_losses = {
        m['step']: m['train/loss'] for m in _metrics(reference['workdir']) if 'train/loss' in m
    }
    losses = {m['step']: m['train/loss'] for m in _metrics(workdir) if 'train/loss' in m}
    assert [losses[s] for s in range(1, NUM_STEPS + 1)] == [
        reference_losses[s] for s in range(1, NUM_STEPS + 1)
    ]


def test_setup_from_flags_and_environment():
    resolve = distributed.resolve_setup
    assert resolve(environ={}) is None
    assert resolve(auto_detect=True, environ={}) == distributed.Setup(None, None, None)
    assert resolve('10.0.0.1:1234', 4, 3, environ={}) == distributed.Setup('10.0.0.1:1234', 4, 3)
    environ = {'JAX_COORDINATOR_ADDRESS': 'h:99', 'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '1'}
    assert resolve(environ=environ) == distributed.Setup('h:99', 2, 1)
    assert resolve(process_id=0, environ=environ) == distributed.Setup('h:99', 2, 0)
    # Auto-detection fills in what is not given.
    assert resolve(num_processes=2, auto_detect=True, environ={}) == distributed.Setup(
        None, 2, None
    )

    with pytest.raises(distributed.SetupError, match='--process_id / JAX_PROCESS_ID missing'):
        resolve('h:1', 2, environ={})
    with pytest.raises(distributed.SetupError, match='JAX_COORDINATOR_ADDRESS and --num_proc'):
        resolve(process_id=1, environ={})
    with pytest.raises(distributed.SetupError, match="'h' must be HOST:PORT"):
        resolve('h', 2, 0, environ={})
    with pytest.raises(distributed.SetupError, match=r'in \[0, 2\), got 2'):
        resolve('h:1', 2, 2, environ={})
    with pytest.raises(distributed.SetupError, match="JAX_NUM_PROCESSES='two' is not an integer"):
        resolve(environ={'JAX_NUM_PROCESSES': 'two'})


@pytest.mark.timeout(120)
def test_incomplete_setup_on_the_command_line_exits_2(env, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, 'train.py'),
            '--config',
            env['config_path'],
            '--workdir',
            str(tmp_path),
            '--coordinator_address=127.0.0.1:1234',
            '--num_processes=2',
        ],
        cwd=REPO,
        env=env['env'],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 2
    assert 'incomplete distributed set-up' in result.stderr
    assert '--process_id / JAX_PROCESS_ID missing' in result.stderr
    assert not os.listdir(tmp_path)  # stopped before touching the workdir


def test_best_checkpoint_by_any_metric_with_saves_in_flight(tmp_path):
    """Evaluations at consecutive steps: each best save starts while the previous one is still
    being written, and a reopened workdir knows its best value."""
    import jax.numpy as jnp

    from crossformer_jax.training import checkpointing

    checkpoints = checkpointing.Checkpoints(str(tmp_path), keep=2, best_metric='miou')
    saved = []
    for step, miou in [(1, 0.5), (2, 0.7), (3, 0.6), (4, 0.7), (5, 0.8)]:
        state = {'w': jnp.full((3,), float(step))}
        saved.append(checkpoints.save_if_best(step, state, {'miou': miou, 'loss': 1.0}))
        assert checkpoints.save(step, state)
    assert saved == [True, True, False, False, True]
    checkpoints.close()

    checkpoints = checkpointing.Checkpoints(str(tmp_path), keep=2, best_metric='miou')
    assert checkpoints.latest.all_steps() == [4, 5]
    assert (checkpoints.best_step(), checkpoints.best_value()) == (5, 0.8)
    assert not checkpoints.save_if_best(6, {'w': jnp.zeros(3)}, {'miou': 0.75})
    with pytest.raises(KeyError, match="best_metric 'miou' is not among the evaluation metrics"):
        checkpoints.save_if_best(6, {'w': jnp.zeros(3)}, {'top1': 0.9})
    target = {'w': jax.ShapeDtypeStruct((3,), np.float32)}
    assert checkpoints.restore(target, which='best')['w'].tolist() == [5.0, 5.0, 5.0]
    checkpoints.close()
