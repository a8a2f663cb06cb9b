"""Shared test fixtures: process-wide state starts fresh in every test."""

import pytest

from crossformer_jax.data import pipeline


@pytest.fixture(autouse=True)
def fresh_corrupt_image_count():
    """The corrupt-image counter is per process: reset it so no test sees another's count."""
    pipeline.reset_corrupt_image_count()
    yield
    pipeline.reset_corrupt_image_count()
