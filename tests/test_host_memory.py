"""crossformer_jax.cpu.host_memory: glibc keeps freed blocks for reuse; the CPU-run detection."""

import ctypes
import json
import subprocess
import sys

import pytest

from crossformer_jax.cpu import host_memory

# A worker thread (as XLA's are) allocates and touches a 256 MiB block, frees it, and does it
# again; the child prints the page faults of the second round.
REUSE_SCRIPT = r"""
import ctypes, json, resource, sys, threading
from crossformer_jax.cpu import host_memory
kept = host_memory.keep_freed_memory() if sys.argv[1] == 'keep' else None
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size = 256 << 20
faults = []

def rounds():
    for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)

worker = threading.Thread(target=rounds)
worker.start()
worker.join()
print(json.dumps({'kept': kept, 'faults': faults}))
"""


def run_reuse(setting: str) -> dict:
    result = subprocess.run(
        [sys.executable, '-c', REUSE_SCRIPT, setting],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc only')
def test_freed_block_is_reused_without_page_faults():
    pages = (256 << 20) // 4096
    default = run_reuse('default')
    # glibc's default: the block is a fresh mmap every time, so both rounds fault every page.
    assert default['faults'][0] >= pages * 0.9 and default['faults'][1] >= pages * 0.9
    kept = run_reuse('keep')
    assert kept['kept'] is True
    assert kept['faults'][0] >= pages * 0.9  # first touch of the heap
    assert kept['faults'][1] < pages * 0.02  # the same pages again


def test_not_glibc_leaves_malloc_alone(monkeypatch):
    def no_libc(name):
        raise OSError(f'{name}: cannot open shared object file')

    monkeypatch.setattr(ctypes, 'CDLL', no_libc)
    assert host_memory.keep_freed_memory() is False


@pytest.mark.parametrize(
    ('platforms', 'expected'),
    [('cpu', True), ('cuda', False), ('tpu,cpu', False), ('cpu,cuda', True)],
)
def test_runs_on_cpu_follows_jax_platforms(monkeypatch, platforms, expected):
    monkeypatch.setenv('JAX_PLATFORMS', platforms)
    assert host_memory.runs_on_cpu() is expected


def test_runs_on_cpu_sees_accelerator_plugins(monkeypatch):
    monkeypatch.delenv('JAX_PLATFORMS', raising=False)
    monkeypatch.setattr(host_memory.importlib.metadata, 'entry_points', lambda group: [])
    found = set()
    monkeypatch.setattr(
        host_memory.importlib.util, 'find_spec', lambda name: name if name in found else None
    )
    assert host_memory.runs_on_cpu() is True
    found.add('libtpu')  # installed for compiling only: no chip attached
    monkeypatch.setattr(host_memory.glob, 'glob', lambda pattern: [])
    assert host_memory.runs_on_cpu() is True
    monkeypatch.setattr(
        host_memory.glob, 'glob', lambda pattern: ['/dev/accel0'] if 'accel' in pattern else []
    )
    assert host_memory.runs_on_cpu() is False
    found.clear()
    monkeypatch.setattr(host_memory.importlib.metadata, 'entry_points', lambda group: ['cuda'])
    assert host_memory.runs_on_cpu() is False
