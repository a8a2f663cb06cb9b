"""Joining a multi-process JAX run (several hosts of a TPU slice, several GPU machines...).

Every process of the run calls `initialize` before any other JAX call, with either

* all three of coordinator address (host:port of process 0), number of processes and this
  process's id, given as arguments or as the environment variables JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES, JAX_PROCESS_ID (arguments win), or
* none of them and `auto_detect=True`: JAX finds them on a Cloud TPU slice, under SLURM, Open MPI
  or Kubernetes (values that are given still override what it finds).

Only some of the three without `auto_detect` is an error that names the missing ones.

Failure detection: each process sends heartbeats to the coordination service on process 0. When
a process dies (kill -9, a lost machine), the service marks it dead after `heartbeat_timeout_s`
without a heartbeat and every other process is terminated (abort, exit code 134); when process 0
itself dies, the others fail as soon as they next talk to it, and at the latest when their own
heartbeats have failed for `heartbeat_timeout_s`. So a run never hangs for much longer than
`heartbeat_timeout_s` after losing a process, and running the same command again on every host
resumes from the last complete checkpoint. A process that exits on its own while the others go
on (an error in that process only) waits up to `shutdown_timeout_s` for them in JAX's shutdown
barrier; then all of them are terminated the same way. (That wait is longer than the heartbeat
bound so that a normal end, where process 0 still writes its logs, is never cut short.)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

ADDRESS_ENV = 'JAX_COORDINATOR_ADDRESS'
NUM_PROCESSES_ENV = 'JAX_NUM_PROCESSES'
PROCESS_ID_ENV = 'JAX_PROCESS_ID'
DEFAULT_HEARTBEAT_TIMEOUT_S = 60
DEFAULT_INITIALIZATION_TIMEOUT_S = 300
DEFAULT_SHUTDOWN_TIMEOUT_S = 120


class SetupError(ValueError):
    """The distributed set-up is incomplete or inconsistent."""


@dataclasses.dataclass(frozen=True)
class Setup:
    """How this process joins the run; None fields are left to JAX's auto-detection."""

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None


def resolve_setup(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto_detect: bool = False,
    environ: Mapping[str, str] = os.environ,
) -> Setup | None:
    """The set-up from arguments, else environment variables; None for a single-process run.

    Raises SetupError when only some of the three are known and auto_detect is off, or when a
    value is malformed (address without a port, process id out of range...).
    """
    address = coordinator_address or environ.get(ADDRESS_ENV) or None
    count = _as_int(
        num_processes, environ.get(NUM_PROCESSES_ENV), '--num_processes', NUM_PROCESSES_ENV
    )
    index = _as_int(process_id, environ.get(PROCESS_ID_ENV), '--process_id', PROCESS_ID_ENV)
    setup = Setup(address, count, index)
    given = {
        f'--coordinator_address / {ADDRESS_ENV}': address,
        f'--num_processes / {NUM_PROCESSES_ENV}': count,
        f'--process_id / {PROCESS_ID_ENV}': index,
    }
    missing = [name for name, value in given.items() if value is None]
    if len(missing) == len(given):
        return setup if auto_detect else None
    if missing and not auto_detect:
        present = ', '.join(
            f'{name}={value!r}' for name, value in given.items() if value is not None
        )
        raise SetupError(
            f'incomplete distributed set-up: {present} given, but {" and ".join(missing)} '
            f'missing; give all three, or add --multihost to let JAX detect the rest '
            f'(TPU, SLURM, Open MPI, Kubernetes)'
        )
    if address is not None:
        host, _, port = address.rpartition(':')
        if not host or not port.isdigit():
            raise SetupError(
                f'coordinator address {address!r} must be HOST:PORT (process 0 listens on PORT)'
            )
    if count is not None and count < 1:
        raise SetupError(f'the number of processes must be at least 1, got {count}')
    if index is not None and (index < 0 or (count is not None and index >= count)):
        raise SetupError(
            f'the process id must be in [0, {count if count is not None else "num_processes"}), '
            f'got {index}'
        )
    return setup


def _as_int(value: int | None, env_value: str | None, flag: str, env_name: str) -> int | None:
    if value is not None:
        return int(value)
    if env_value is None or env_value == '':
        return None
    try:
        return int(env_value)
    except ValueError:
        raise SetupError(f'{env_name}={env_value!r} is not an integer (or pass {flag})') from None


def initialize(
    setup: Setup | None,
    *,
    heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S,
    initialization_timeout_s: int = DEFAULT_INITIALIZATION_TIMEOUT_S,
    shutdown_timeout_s: int = DEFAULT_SHUTDOWN_TIMEOUT_S,
) -> None:
    """Calls jax.distributed.initialize for a multi-process set-up (nothing for None).

    Must run before any other JAX call. heartbeat_timeout_s bounds how long the processes run on
    after one of them is lost (see the module docstring); initialization_timeout_s is how long
    each process waits for all the others to connect at the start, shutdown_timeout_s how long
    a finished process waits for the others at exit.
    """
    if setup is None:
        return
    if heartbeat_timeout_s < 1:
        raise SetupError(f'the heartbeat timeout must be at least 1 s, got {heartbeat_timeout_s}')
    import jax

    jax.distributed.initialize(
        coordinator_address=setup.coordinator_address,
        num_processes=setup.num_processes,
        process_id=setup.process_id,
        initialization_timeout=initialization_timeout_s,
        heartbeat_timeout_seconds=heartbeat_timeout_s,
        shutdown_timeout_seconds=shutdown_timeout_s,
    )
