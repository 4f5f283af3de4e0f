"""Host allocator setting for long runs that allocate and free many large tensors (layer streaming, stage 2).

glibc's ``malloc`` serves a request from its heap below a *dynamic* mmap threshold, which rises to the size of every
mmapped block freed (up to 32 MiB on 64-bit, ``mallopt(3)``). A run that onloads a decoder layer, frees it, onloads
the next one and builds fp64 Gram matrices in between then leaves freed multi-MiB blocks inside the heap, where a
small live allocation above them keeps the heap from shrinking: the process's anonymous memory climbs although the
live tensors do not. Measured on the 1B-parameter streamed run of ``benchmarks/bench_scale.py`` (2 CPU threads):
peak anonymous memory 2.88 GiB with the default and 1.69 GiB with a fixed 1 MiB threshold, which also ran faster
(154 s vs 368 s, the same machine under the same load). Setting ``M_MMAP_THRESHOLD`` fixes the threshold (and turns
the dynamic adjustment off): every block of at least that size is its own mapping, returned to the system on free.
This is the same knob as the ``MALLOC_MMAP_THRESHOLD_`` environment variable, set from inside the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

#: ``mallopt`` parameter number of ``M_MMAP_THRESHOLD`` in glibc's ``<malloc.h>``.
M_MMAP_THRESHOLD = -3
#: Default threshold (bytes): blocks of 1 MiB and more are mapped on their own.
DEFAULT_THRESHOLD = 1 << 20


def _glibc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # only glibc has it (musl, macOS do not): their malloc has no such threshold
        return libc
    except (OSError, AttributeError):
        return None


def return_large_blocks_to_os(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Make the C allocator map every block of at least ``threshold`` bytes on its own, so freeing it returns the
    memory to the system (module docstring). Process-wide; the CLI calls it once at start-up.

    Args:
        threshold: bytes, ``0 < threshold <= 32 MiB`` (glibc's largest accepted value on 64-bit).

    Returns:
        True when set; False where the C library is not glibc (nothing changed).

    Raises:
        ValueError: ``threshold`` out of range.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 0 < threshold <= 32 << 20:
        raise ValueError(f"threshold: need an int in (0, 32 MiB] bytes, got {threshold!r}")
    libc = _glibc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(threshold)))
    if ok:
        logger.debug("glibc malloc: blocks >= %d bytes are mmapped (returned to the system on free)", threshold)
    return ok
