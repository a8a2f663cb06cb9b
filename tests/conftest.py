"""Shared test fixtures: process-wide state starts fresh in every test."""

import pytest

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
