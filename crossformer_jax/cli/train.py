"""The command line of train.py: train, evaluate or time a CrossFormer model (config.task).

    python train.py --config configs/crossformer_tiny.py --workdir runs/tiny \
        [--config.batch_size=256 ...] [--mode train|evaluate|throughput]
        [--multihost | --coordinator_address=HOST:PORT --num_processes=N --process_id=I]
        [--host_malloc=auto|keep|default]

train:      trains from scratch, from config.init_from, or resumes from WORKDIR's checkpoints;
            writes WORKDIR/config.json, TensorBoard logs and checkpoints.
evaluate:   top-1 / top-5 / loss (segmentation: mIoU / aAcc / mAcc) on the validation split, from
            WORKDIR's best (or latest) checkpoint, or from a converted checkpoint directory given
            as --config.init_from.
throughput: images per second of the jit-compiled forward pass.
compile:    compiles the train and evaluation steps ahead of time for --topology (a TPU slice,
            described by libtpu; no TPU needed) and reports their memory and FLOPs per device;
            exit 0 when they fit the chips' HBM, 1 when not, 2 without libtpu.

--host_malloc: on a CPU run (auto) glibc keeps freed host memory for reuse, so that XLA:CPU's
per-step temporary buffer is not faulted in again every step (crossformer_jax/cpu/host_memory.py).

Exit codes: 0 on success and after a preemption (SIGTERM; the checkpoint is saved, rerun to
resume), 1 when the loss becomes NaN/inf (nothing is saved after it), 2 for a bad configuration.

Several processes (hosts): every process runs the same command; with --multihost JAX detects the
set-up (TPU slice, SLURM, Open MPI, Kubernetes), else give --coordinator_address (HOST:PORT of
process 0), --num_processes and --process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID). When a process dies, the others abort (exit code 134) within about
--heartbeat_timeout seconds; the same command on every host then resumes.
"""

import json
import logging as pylogging
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from crossformer_jax.cpu import host_memory
from crossformer_jax.runtime import distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Experiment configuration file (configs/*.py).', lock_config=True
)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and the resolved config.')
flags.DEFINE_enum('mode', 'train', ['train', 'evaluate', 'throughput', 'compile'], 'What to do.')
flags.DEFINE_string(
    'topology',
    None,
    '--mode compile: the TPU slice to compile for, GENERATION:SHAPE (e.g. v5e:2x2, v4:2x2x1, '
    'v6e:4x8); needs libtpu (the tpu extra), not a TPU.',
)
flags.DEFINE_string(
    'compilation_cache_dir',
    os.path.join(os.path.expanduser('~'), '.cache', 'crossformer_jax', 'xla'),
    "JAX's persistent compilation cache: a restarted run reuses its compiled programs; '' turns "
    'it off.',
)
flags.DEFINE_bool(
    'multihost',
    os.environ.get('CROSSFORMER_MULTIHOST', '') == '1',
    'Several processes: let JAX detect the set-up (TPU slice, SLURM, Open MPI, Kubernetes); '
    'also set by CROSSFORMER_MULTIHOST=1.',
)
flags.DEFINE_string(
    'coordinator_address',
    None,
    'HOST:PORT of process 0, where the coordination service listens (or JAX_COORDINATOR_ADDRESS).',
)
flags.DEFINE_integer(
    'num_processes', None, 'Number of processes of the run (or JAX_NUM_PROCESSES).', lower_bound=1
)
flags.DEFINE_integer(
    'process_id', None, 'This process, in [0, num_processes) (or JAX_PROCESS_ID).', lower_bound=0
)
flags.DEFINE_integer(
    'heartbeat_timeout',
    distributed.DEFAULT_HEARTBEAT_TIMEOUT_S,
    'Seconds without a heartbeat after which a lost process is declared dead and the others '
    'abort (several processes only).',
    lower_bound=1,
)
flags.DEFINE_enum(
    'host_malloc',
    'auto',
    ['auto', 'keep', 'default'],
    'keep: glibc keeps freed host memory for reuse, so that XLA:CPU does not fault its temporary '
    "buffer in again every step (crossformer_jax/cpu/host_memory.py); default: glibc's behaviour; "
    'auto: keep when JAX will run on the CPU.',
)
flags.mark_flags_as_required(['config'])


class _OwnInfoOnly(pylogging.Filter):
    """Drops the INFO chatter of libraries (orbax logs every save); keeps their warnings."""

    def filter(self, record):
        return record.levelno >= pylogging.WARNING or 'site-packages' not in record.pathname


def compile_for_topology(config) -> int:
    """--mode compile: the reports of every program, then one JSON line; the exit status."""
    from crossformer_jax.training import aot

    try:
        topology = aot.describe_topology(FLAGS.topology)
    except aot.TopologyError as e:
        logging.error('%s', e)
        return 2
    reports, _ = aot.compile_config(config, topology)
    forward_flops = aot.model_flops_per_image(config)
    print(
        f'{config.model.name} on {topology.name}: {len(topology.devices)} x '
        f'{topology.device_kind}, global batch {config.batch_size}'
    )
    for report in reports:
        print(aot.format_report(report, forward_flops, train=report.name == 'train_step'))
    too_large = [r for r in reports if not r.fits]
    for report in too_large:
        print(
            f'error: {report.name} needs {report.peak_bytes / aot.GIB:.2f} GiB per device, '
            f'{(report.peak_bytes - report.hbm_bytes) / aot.GIB:.2f} GiB more than the '
            f'{report.hbm_bytes / aot.GIB:.0f} GiB of a {topology.device_kind} device'
        )
    summary = {
        'topology': topology.name,
        'device_kind': topology.device_kind,
        'num_devices': len(topology.devices),
        'model': config.model.name,
        'global_batch': config.batch_size,
        'model_flops_per_image': forward_flops,
        'programs': [r.to_json() for r in reports],
        'fits': not too_large,
    }
    print(json.dumps(summary), flush=True)
    return 1 if too_large else 0


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if FLAGS.mode == 'train' and not FLAGS.workdir:
        raise app.UsageError('--workdir is required for --mode train')
    if FLAGS.mode == 'compile' and not FLAGS.topology:
        raise app.UsageError('--topology is required for --mode compile (e.g. v5e:2x2)')

    logging.get_absl_handler().addFilter(_OwnInfoOnly())
    if FLAGS.mode == 'compile':
        # The host compiles, the topology's chips would run; no persistent cache: an executable
        # for chips this host does not have cannot be read back from it.
        jax.config.update('jax_platforms', 'cpu')
        try:
            sys.exit(compile_for_topology(FLAGS.config))
        except (ValueError, KeyError) as e:
            logging.error('Configuration error: %s', e)
            sys.exit(2)
    if FLAGS.compilation_cache_dir:
        jax.config.update('jax_compilation_cache_dir', FLAGS.compilation_cache_dir)
    # Before any JAX backend or thread exists: the setting binds the threads created after it.
    if FLAGS.host_malloc == 'keep' or (FLAGS.host_malloc == 'auto' and host_memory.runs_on_cpu()):
        host_memory.keep_freed_memory()
    try:
        setup = distributed.resolve_setup(
            FLAGS.coordinator_address,
            FLAGS.num_processes,
            FLAGS.process_id,
            auto_detect=FLAGS.multihost,
        )
        distributed.initialize(setup, heartbeat_timeout_s=FLAGS.heartbeat_timeout)
    except distributed.SetupError as e:
        logging.error('Distributed set-up error: %s', e)
        sys.exit(2)
    # JAX's backend (its first query below), TensorFlow and the loop start only now, after the
    # malloc setting and the distributed runtime, which must both come first.
    if jax.process_index() != 0:  # only process 0 talks
        logging.set_verbosity(logging.ERROR)
    import tensorflow as tf

    tf.config.set_visible_devices([], 'GPU')  # the input pipeline must leave the GPUs to JAX

    from crossformer_jax import tasks
    from crossformer_jax.training import trainer

    logging.info(
        'JAX %s, %d process(es), devices: %s', jax.__version__, jax.process_count(), jax.devices()
    )
    config = FLAGS.config
    try:
        if FLAGS.mode == 'train':
            trainer.train_and_evaluate(config, FLAGS.workdir)
        elif FLAGS.mode == 'evaluate':
            metrics = trainer.evaluate(config, FLAGS.workdir)
            print(tasks.task_class(config).describe(metrics))
        else:
            rate = trainer.measure_throughput(config)
            print(f'{rate:.1f} images/s')
    except trainer.ConfigError as e:
        logging.error('Configuration error: %s', e)
        sys.exit(2)
    except trainer.NonFiniteLossError as e:
        logging.error('Stopped: %s', e)
        sys.exit(1)


def add_config_root(argv: list[str]) -> None:
    """Puts the folder that holds the config's package (configs/ of a checkout) on sys.path, so a
    config file given by path imports its `configs.common` from wherever the command runs."""
    for i, arg in enumerate(argv):
        if arg == '--config' and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith('--config='):
            path = arg.split('=', 1)[1]
        else:
            continue
        folder = os.path.dirname(os.path.abspath(path.split(':', 1)[0]))
        while os.path.isfile(os.path.join(folder, '__init__.py')):
            folder = os.path.dirname(folder)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        return


def run() -> None:
    """Entry point of train.py and the crossformer-train command."""
    add_config_root(sys.argv)
    app.run(main)


if __name__ == '__main__':
    run()
