"""The host allocator setting (gradmap.engine.allocator), checked in fresh processes against /proc's RssAnon."""

import subprocess
import sys

import pytest

from gradmap.engine.allocator import _glibc, return_large_blocks_to_os

# Free a 24 MiB block first (glibc's dynamic threshold then rises to 24 MiB), then allocate eight 8 MiB blocks with a
# 256 KiB live allocation above each, free the big ones, and print how much anonymous memory stayed (KiB).
PROBE = r"""
import ctypes, sys
from gradmap.engine.allocator import return_large_blocks_to_os
if sys.argv[1] == "set":
    assert return_large_blocks_to_os()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def anon():
    return int(open("/proc/self/status").read().split("RssAnon:")[1].split()[0])
def touch(p, n):
    ctypes.memset(p, 1, n)
b = libc.malloc(24 << 20); touch(b, 24 << 20); libc.free(b)
before = anon()
big, small = [], []
for _ in range(8):
    p = libc.malloc(8 << 20); touch(p, 8 << 20); big.append(p)
    q = libc.malloc(256 << 10); touch(q, 256 << 10); small.append(q)
for p in big:
    libc.free(p)
print(anon() - before)
"""


def _retained_kib(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(_glibc() is None, reason="the mmap threshold is a glibc malloc setting")
def test_freed_large_blocks_return_to_the_system():
    # default glibc: the 8 MiB blocks sit in the heap below the 24 MiB dynamic threshold, pinned by the small ones
    assert _retained_kib("default") > 48 * 1024
    # threshold 1 MiB: each is its own mapping, unmapped on free (only the small allocations remain)
    assert _retained_kib("set") < 3 * 1024  # the eight 256 KiB blocks (2 MiB) stay


def test_threshold_is_validated():
    for bad in (0, -1, 64 << 20, 1.5, True):
        with pytest.raises(ValueError, match="threshold"):
            return_large_blocks_to_os(bad)
