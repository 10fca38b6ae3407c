"""glibc's heap, tuned for a run: fewer page faults between images, memory given back past a budget.

``fast_allocator()`` is the run's context: the CLI enters it around a whole run (a script or a
notebook can too). Outside it, nothing here changes the process: ``release_heap_above`` and
``bounded_allocator`` do their work only inside a run, so a library call leaves glibc's settings
and heap as it found them.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import threading
from collections.abc import Iterator

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536
_BOUNDED_THRESHOLD = 256 * 1024


# M_TRIM_THRESHOLD -1: the heap is never trimmed. (A 1 GB threshold let a batch of four 512 px maps,
# 537 MB each, be given back and faulted in again at every layer: 2.5 million faults an encode.)
_NEVER_TRIM = -1
_lock = threading.Lock()
_depth = 0


def _libc():
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        lib.mallopt  # noqa: B018 - glibc only
        lib.malloc_trim  # noqa: B018
        return lib
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


@contextlib.contextmanager
def fast_allocator() -> Iterator[None]:
    """Keep freed memory in the process heap while inside (re-entrant, thread-safe)."""
    global _depth
    if _LIBC is None:
        yield
        return
    with _lock:
        if _depth == 0:
            _LIBC.mallopt(_M_MMAP_MAX, 0)
            _LIBC.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)  # (malloc_trim on the way out)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _LIBC.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                _LIBC.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
                _LIBC.malloc_trim(0)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_free() -> int:
    """Bytes glibc holds free for this process's next allocations (mallinfo2's fordblks, all
    arenas); 0 where unknown (not glibc, or glibc before 2.33)."""
    fn = getattr(_LIBC, "mallinfo2", None)
    if fn is None:
        return 0
    fn.restype = _Mallinfo2
    return int(fn().fordblks)


def release_heap_above(limit: int) -> None:
    """Inside a held ``fast_allocator``, give the free heap back to the system once it exceeds
    ``limit`` bytes: images of many sizes leave holes that a heap keeping everything cannot always
    reuse. (glibc counts the holes it has given back as free still: a heap that fragmented past
    ``limit`` is trimmed after every image, and each one pays its faults, as before the run kept
    its heap. Without mallinfo2, before glibc 2.33, nothing is given back before the run ends.)"""
    if _LIBC is not None and _depth > 0 and heap_free() > limit:
        _LIBC.malloc_trim(0)


@contextlib.contextmanager
def bounded_allocator() -> Iterator[None]:
    """Inside, blocks over 256 KB get pages of their own again, returned to the system when freed,
    within ``fast_allocator`` too: for images computed in bands (``vqcli.speed.tiling``), where the memory
    bound matters more than page faults. Bands of many sizes leave holes in a heap that keeps what
    is freed, and the process grows far past its budget: the SD decoder at 512 px in bands of a
    200 MB budget grew by 318 MB with glibc's own settings, by 400 MB and more inside
    ``fast_allocator``, by 214 MB inside this (4096 px at a 5.7 GB budget: 13 GB before)."""
    if _LIBC is None or _depth == 0:  # outside a run the process's settings are not ours to change
        yield
        return
    with _lock:
        _LIBC.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        _LIBC.mallopt(_M_MMAP_THRESHOLD, _BOUNDED_THRESHOLD)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, _BOUNDED_THRESHOLD)
        _LIBC.malloc_trim(0)
    try:
        yield
    finally:
        with _lock:
            _LIBC.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_MMAP_THRESHOLD)
            if _depth > 0:  # back to fast_allocator's settings
                _LIBC.mallopt(_M_MMAP_MAX, 0)
                _LIBC.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)  # (malloc_trim on the way out)
            else:
                _LIBC.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
