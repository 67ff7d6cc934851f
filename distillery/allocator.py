"""glibc's allocator, told to give memory back: torch's CPU tensors are plain malloc blocks.

glibc serves a block under its mmap threshold from the heap, and a freed heap block stays resident
until the heap's top is free. The threshold starts at 128 KB and rises to the size of each freed
mapped block, up to 32 MB, so after the first step of a training loop every (positions x
vocabulary) buffer and activation under 32 MB comes from the heap, and freed ones keep their pages.
Outside glibc (macOS, musl) both functions do nothing.
"""

from __future__ import annotations

import ctypes
import functools

M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h


@functools.cache
def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    """Hand memory that Python and torch have freed back to the operating system (malloc_trim)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def map_large_blocks(threshold_bytes: int) -> bool:
    """Serve every block of `threshold_bytes` or more by its own mapping, freed to the system at
    once, and keep the threshold there (a fixed threshold stops glibc raising it). Returns whether
    the setting took."""
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, threshold_bytes) == 1)
