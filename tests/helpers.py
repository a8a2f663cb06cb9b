"""Helpers shared by the tests: random images, a synthetic image folder, readers of a workdir's
metrics, checkpoint steps and saved parameters, the primitives switch (plain JAX or the CPU
plug-in), and the plain-JAX group attention the kernels are checked against."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from crossformer_jax.cpu import kernels as cpu_kernels
from crossformer_jax.models import ops
from crossformer_jax.models.crossformer import MASKED_LOGIT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = 3

# XLA flags of the train.py subprocesses of the training tests. One thread per op: multi-threaded
# Eigen contractions on CPU may sum partial results in a different order from run to run (seen as
# rare one-ulp differences), so only single-threaded runs can be compared bit for bit with a
# resumed run. No LLVM optimization: the tiny programs compile in about half the time (a cold
# train.py run of test_training: 35 s instead of 58 s), and every run of a test module uses the
# same flags, so runs still compare exactly. The model's numerics at the default optimization
# level are what the parity tests check, in process.
TRAIN_SUBPROCESS_XLA_FLAGS = '--xla_cpu_multi_thread_eigen=false --xla_backend_optimization_level=0'


# The cpu extra (MKL) is published for x86-64 Linux only; elsewhere the plug-in cannot be built.
CPU_PLUGIN_PLATFORM = platform.machine() == 'x86_64' and sys.platform == 'linux'
PRIMITIVES = ('plain', 'cpu') if CPU_PLUGIN_PLATFORM else ('plain',)
needs_cpu_plugin = pytest.mark.skipif(
    not CPU_PLUGIN_PLATFORM, reason='the cpu extra (MKL) exists for x86-64 Linux only'
)


@contextlib.contextmanager
def primitives(name: str):
    """Traces inside the block with the plain primitives or with the CPU plug-in's kernels (which
    the test extra installs: a failed build fails the test); the previous ones come back after."""
    if name == 'cpu':
        cpu_kernels.load()
    with ops.using(cpu_kernels.CPU_OPS if name == 'cpu' else ops.PLAIN):
        yield


def plain_group_attention(qkv, position_bias, key_bias, keep, num_heads):
    """group_attention's definition in plain JAX (jax.nn.softmax, autodiff gradients)."""
    b, t, c3 = qkv.shape
    head_dim = c3 // 3 // num_heads
    q, k, v = jnp.transpose(qkv.reshape(b, t, 3, num_heads, head_dim), (2, 0, 3, 1, 4))
    logits = jnp.einsum('bhqd,bhkd->bhqk', q, k) * head_dim**-0.5 + position_bias
    if key_bias is not None:
        logits = logits + jnp.tile(key_bias, (b // key_bias.shape[0], 1))[:, None, None, :]
    weights = jax.nn.softmax(logits, axis=-1)
    if keep is not None:
        weights = weights * keep
    out = jnp.einsum('bhqk,bhkd->bqhd', weights, v)
    return out.reshape(b, t, c3 // 3)


def attention_inputs(rng, groups=6, tokens=5, heads=2, head_dim=3, key_groups=3):
    """qkv, position bias, a key bias that masks the last 2 keys of the last key-bias group (as
    padding does) and a dropout keep (0 or 2), float64 NumPy arrays."""
    qkv = rng.standard_normal((groups, tokens, 3 * heads * head_dim))
    position_bias = rng.standard_normal((heads, tokens, tokens))
    key_bias = np.zeros((key_groups, tokens))
    key_bias[-1, -2:] = MASKED_LOGIT
    keep = 2.0 * (rng.random((groups, heads, tokens, tokens)) < 0.5)
    return qkv, position_bias, key_bias, keep


def _write_image_folder(root: str, per_class: dict[str, int]) -> None:
    """Class c: a bright square in quadrant c over noise, in a class-specific tint."""
    rng = np.random.RandomState(0)
    for split, count in per_class.items():
        for c in range(CLASSES):
            os.makedirs(os.path.join(root, split, f'class_{c}'))
            for i in range(count):
                image = rng.randint(0, 80, size=(32, 32, 3)).astype(np.uint8)
                y, x = divmod(c, 2)
                image[4 + 14 * y : 14 + 14 * y, 4 + 14 * x : 14 + 14 * x] = 220
                image[..., c] = np.maximum(image[..., c], 120)
                Image.fromarray(image).save(os.path.join(root, split, f'class_{c}', f'{i}.png'))


def _metrics(workdir) -> list[dict]:
    """The lines of WORKDIR/metrics.jsonl ([] before the first is written)."""
    path = os.path.join(workdir, 'metrics.jsonl')
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _checkpoint_steps(workdir, sub='checkpoints') -> list[int]:
    """Steps of the finished checkpoints in WORKDIR/sub, ascending."""
    path = os.path.join(workdir, sub)
    return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def _saved_state(workdir, step) -> dict:
    """The whole training state of WORKDIR's checkpoint at step, on one device."""
    import orbax.checkpoint as ocp

    path = os.path.join(str(workdir), 'checkpoints', str(step), 'default')
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        saved = dict(checkpointer.metadata(path).item_metadata)  # possibly from 8 devices
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), saved
        )
        return checkpointer.restore(path, target)


def _params(workdir, step):
    """The parameters of WORKDIR's checkpoint at step, on one device."""
    return _saved_state(workdir, step)['params']


def _assert_same_params(a, b, **tolerance):
    """Equal trees of arrays: bit for bit, or within np.testing.assert_allclose's tolerance."""
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)
    assert len(flat_a) == len(flat_b)
    for (path, x), y in zip(flat_a, flat_b):
        if tolerance:
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), err_msg=str(path), **tolerance)
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def random_image(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    """Uniformly random uint8 (h, w, 3) pixels, the same for the same seed."""
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8)


def init_params(model, rng, image_size: int):
    """Fresh parameters of a model for square images of image_size."""
    return model.init(rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32))['params']


def demo_writer(module: str, function: str):
    """`function` of scripts/<module>.py (the demo data writers are scripts, not package code)."""
    sys.path.insert(0, os.path.join(REPO, 'scripts'))
    try:
        return getattr(importlib.import_module(module), function)
    finally:
        sys.path.pop(0)


def train_py_env(root, config_text: str) -> dict:
    """Writes root/config.py; returns {'root', 'config', 'env'}: train.py subprocesses on the CPU
    with one compilation cache under root."""
    config_path = root / 'config.py'
    config_path.write_text(config_text)
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([REPO] + [p for p in [os.environ.get('PYTHONPATH')] if p]),
        JAX_PLATFORMS='cpu',
        JAX_COMPILATION_CACHE_DIR=str(root / 'jax_cache'),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
        TF_CPP_MIN_LOG_LEVEL='2',
        XLA_FLAGS=TRAIN_SUBPROCESS_XLA_FLAGS,
    )
    return {'root': root, 'config': str(config_path), 'env': env}


def run_train_py(run_env: dict, workdir, *args, mode: str = 'train'):
    """train.py --config run_env['config'] --workdir workdir --mode mode *args; asserts exit 0."""
    command = [
        sys.executable,
        os.path.join(REPO, 'train.py'),
        '--config',
        run_env['config'],
        '--workdir',
        str(workdir),
        '--mode',
        mode,
        *args,
    ]
    result = subprocess.run(
        command, cwd=REPO, env=run_env['env'], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result
