"""The CPU plug-in as a switch: off by default (the models trace plain JAX and nothing is built),
on by one call or $CROSSFORMER_CPU_KERNELS, soft on any build or I/O failure."""

import logging
import os
import stat
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from helpers import REPO, needs_cpu_plugin

from crossformer_jax import cpu
from crossformer_jax.cpu import kernels
from crossformer_jax.models import create_model, ops

NARROW = dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))


def forward_text(model) -> str:
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    return jax.jit(model.apply).lower(variables, images).as_text()


def test_models_trace_plain_jax_by_default():
    assert ops.current() is ops.PLAIN and not cpu.enabled()
    text = forward_text(create_model('crossformer_tiny', num_classes=10, **NARROW))
    assert 'custom_call' not in text and 'crossformer_' not in text


@needs_cpu_plugin
def test_enable_installs_the_kernels_and_disable_removes_them():
    assert cpu.enable(strict=True)
    assert cpu.enabled() and ops.current() is kernels.CPU_OPS
    text = forward_text(create_model('crossformer_tiny', num_classes=10, **NARROW))
    for target in (kernels.LAYER_NORM_FORWARD, kernels.ATTENTION_FORWARD, kernels.CONV_FORWARD):
        assert target in text
    cpu.disable()
    assert not cpu.enabled()
    assert 'crossformer_' not in forward_text(create_model('crossformer_tiny', **NARROW))


def test_enable_fails_soft_on_an_unwritable_cache(tmp_path, monkeypatch, caplog):
    """A build that cannot write its library warns, returns False and leaves plain JAX."""
    monkeypatch.setattr(kernels, '_loaded', False)
    locked = tmp_path / 'locked'
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    monkeypatch.setenv(kernels.CACHE_ENV_VAR, str(locked / 'cache'))
    monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))  # also when root can write
    with caplog.at_level(logging.WARNING):
        assert cpu.enable() is False
    assert ops.current() is ops.PLAIN
    assert 'kernels not enabled, the models stay plain JAX' in caplog.text
    with pytest.raises(kernels.CpuKernelsUnavailable):
        cpu.enable(strict=True)


@needs_cpu_plugin
@pytest.mark.parametrize(
    ('value', 'expected'), [('', False), ('0', False), ('xla', False), ('1', True), ('mkl', True)]
)
def test_environment_variable(value, expected, monkeypatch):
    monkeypatch.setenv(cpu.ENV_VAR, value)
    assert cpu.enable_from_environment() is expected
    assert cpu.enabled() is expected


def test_environment_variable_rejects_other_values(monkeypatch):
    monkeypatch.setenv(cpu.ENV_VAR, 'fast')
    with pytest.raises(ValueError, match=r"CROSSFORMER_CPU_KERNELS must be one of .*found 'fast'"):
        cpu.enable_from_environment()


def test_import_without_mkl_or_compiler_builds_nothing(tmp_path):
    """The default path in a fresh process with no compiler and an empty cache: a forward pass runs
    and nothing is built or cached."""
    env = dict(
        os.environ,
        CXX=str(tmp_path / 'no-such-compiler'),
        CROSSFORMER_JAX_CACHE=str(tmp_path / 'cache'),
        JAX_PLATFORMS='cpu',
    )
    env.pop(cpu.ENV_VAR, None)
    code = (
        'import jax, jax.numpy as jnp, crossformer_jax as c\n'
        "m = c.create_model('crossformer_tiny', num_classes=3, embed_dim=32, depths=(1, 1, 1, 1),"
        ' num_heads=(1, 2, 4, 8))\n'
        'x = jnp.ones((1, 64, 64, 3))\n'
        'print(m.apply(m.init(jax.random.key(0), x), x).shape)\n'
    )
    result = subprocess.run(
        [sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '(1, 3)'
    assert 'kernels' not in result.stderr
    assert not (tmp_path / 'cache').exists()
