"""Unit tests of the FSDP layout rule (`fsdp_spec`) and the state shardings built from it."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from crossformer_jax.runtime.sharding import DATA_AXIS, create_mesh, fsdp_spec, state_shardings


@pytest.mark.parametrize(
    'shape,axis_size,min_size,expected',
    [
        ((64, 256), 8, 1024, P(None, DATA_AXIS)),  # largest dimension
        ((256, 64), 8, 1024, P(DATA_AXIS, None)),
        ((128, 128), 8, 1024, P(None, DATA_AXIS)),  # equal sizes: the last one
        ((3, 3, 1, 96), 8, 1, P(None, None, None, DATA_AXIS)),  # conv kernel: output features
        ((100, 24), 8, 1024, P(None, DATA_AXIS)),  # largest not divisible: the next one
        ((100, 30), 8, 1024, P()),  # nothing divisible: replicated
        ((64, 8), 8, 1024, P()),  # below min_size: replicated
        ((64, 16), 8, 1024, P(DATA_AXIS, None)),  # exactly min_size: split
        ((64, 256), 1, 1, P()),  # one device: nothing to split
        ((), 8, 0, P()),  # scalars (step counters)
    ],
)
def test_fsdp_spec(shape, axis_size, min_size, expected):
    assert fsdp_spec(shape, axis_size, min_size) == expected


def test_state_shardings_follow_the_rule_on_one_device():
    mesh = create_mesh(jax.devices()[:1])
    state = {'w': jax.ShapeDtypeStruct((64, 256), jnp.float32), 'step': jnp.zeros((), jnp.int32)}
    for fsdp in (False, True):
        shardings = state_shardings(state, mesh, fsdp=fsdp, min_size=1)
        assert {k: s.spec for k, s in shardings.items()} == {'w': P(), 'step': P()}
