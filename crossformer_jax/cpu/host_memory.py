"""Keep freed host memory in the process for reuse (glibc's malloc on Linux).

XLA:CPU allocates the temporary buffer of every execution with one `malloc` (2.0 GiB for a
crossformer_small train step at batch 16) and frees it at the end. glibc serves a block that large
with a fresh `mmap` and returns it with `munmap`, so each step faults the whole buffer in again:
about 550,000 page faults per step and seconds of system time, more after other work
(a PyTorch step) used the memory in between. `keep_freed_memory` sets glibc's allocator to serve
every block from one heap and to keep what is freed at its top, so the next step reuses pages
that are already mapped. The process then keeps its peak host memory until it exits.

The setting applies to the threads that allocate for the first time after the call (glibc binds
a thread to an arena at its first `malloc`), so call it first thing, before JAX starts its
backend: `train.py` does when JAX will run on the CPU (`runs_on_cpu`; its --host_malloc flag
decides otherwise), the CPU benchmarks always (for both frameworks). With one heap, threads that
allocate at the same time wait for each other, which is why hosts that feed accelerators keep
glibc's default.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.metadata
import importlib.util
import logging
import os

# mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

_SETTINGS = (
    (M_ARENA_MAX, 1),  # every thread allocates from the main heap ...
    (M_MMAP_MAX, 0),  # ... which also serves large blocks (no mmap per block) ...
    (M_TRIM_THRESHOLD, -1),  # ... and never gives its free top back (-1: SIZE_MAX)
)


def keep_freed_memory() -> bool:
    """Makes glibc's malloc keep freed memory for reuse; True if it was set, False where the C
    library is not glibc (nothing changes then)."""
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into the process, its C library's
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it)
    except (OSError, AttributeError):
        logging.info('host_memory: the C library is not glibc; malloc left as it is')
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    failed = [param for param, value in _SETTINGS if mallopt(param, value) != 1]
    if failed:
        raise RuntimeError(f'host_memory: mallopt refused parameters {failed}')
    return True


# Device nodes of TPU chips on a TPU VM (libtpu alone also serves ahead-of-time compilation on any
# host, so its presence says nothing about where JAX computes).
TPU_DEVICE_PATTERNS = ('/dev/accel*', '/dev/vfio/[0-9]*')


def runs_on_cpu() -> bool:
    """Whether JAX will compute on the CPU, decided without starting a backend: JAX_PLATFORMS
    names only cpu, or no accelerator plugin (a `jax_plugins` entry point or package) is installed
    and no TPU chip is attached."""
    platforms = os.environ.get('JAX_PLATFORMS', '').strip()
    if platforms:
        return platforms.split(',')[0].strip() == 'cpu'
    if importlib.metadata.entry_points(group='jax_plugins'):
        return False
    if importlib.util.find_spec('jax_plugins'):
        return False
    tpu_chips = any(glob.glob(pattern) for pattern in TPU_DEVICE_PATTERNS)
    return not (tpu_chips and importlib.util.find_spec('libtpu'))
