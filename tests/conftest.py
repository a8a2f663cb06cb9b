"""Shared test fixtures: process-wide state starts fresh in every test."""

import pytest

from crossformer_jax import input_pipeline


@pytest.fixture(autouse=True)
def fresh_corrupt_image_count():
    """The corrupt-image counter is per process: reset it so no test sees another's count."""
    input_pipeline.reset_corrupt_image_count()
    yield
    input_pipeline.reset_corrupt_image_count()
