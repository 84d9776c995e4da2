"""Giving freed memory back to the operating system between blocks.

glibc keeps the pages of freed tensors for reuse, so a loop that frees one block's activations and
allocates the next block's shows a resident size well above what it holds; ``malloc_trim`` returns
them. Elsewhere than glibc this does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        library = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return library if library is not None and hasattr(library, "malloc_trim") else None


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the operating system (glibc's ``malloc_trim(0)``)."""
    library = _libc()
    if library is not None:
        library.malloc_trim(0)
