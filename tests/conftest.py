"""Shared test fixtures: process-wide state starts fresh in every test."""

import os

import pytest

# The tests compute on the CPU, also where libtpu is installed (for compiling TPU programs); libtpu
# may be loaded by several test processes at once.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

from crossformer_jax.data import pipeline
from crossformer_jax.models import ops


@pytest.fixture(autouse=True)
def fresh_corrupt_image_count():
    """The corrupt-image counter is per process: reset it so no test sees another's count."""
    pipeline.reset_corrupt_image_count()
    yield
    pipeline.reset_corrupt_image_count()


@pytest.fixture(autouse=True)
def plain_primitives():
    """Every test starts with the models' plain primitives, whatever an earlier test of the process
    enabled (the CPU plug-in, in-process benchmark runs)."""
    ops.set_ops(ops.PLAIN)
    yield
    ops.set_ops(ops.PLAIN)
