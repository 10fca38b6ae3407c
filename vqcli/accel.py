"""The inference fast path: allocator settings, memory format and reduced precision.

Each piece was measured (see benchmarks/) and is kept because it pays:

- ``fast_allocator``: the activations of these networks are tens to hundreds of MB. glibc serves
  such blocks with mmap and unmaps them on free, so every layer's output is page-faulted in afresh:
  a third of the process time went to the kernel. Inside this context glibc keeps freed memory
  in its heap (no mmap for large blocks, no trimming), so after the first image no page faults
  remain. The previous settings are restored and the heap trimmed on exit. A no-op off glibc.
- channels-last memory format with bfloat16: oneDNN's bf16 convolutions run about twice as fast
  in NHWC; in float32 NHWC did not pay on this CPU, so float32 stays NCHW.
- bfloat16 autocast keeps GroupNorm statistics in float32 (PyTorch's CPU and CUDA autocast
  policies run group_norm in float32).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import threading
from collections.abc import Iterator

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536

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
            _LIBC.mallopt(_M_TRIM_THRESHOLD, 2**30)
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


def memory_format_for(dtype: torch.dtype) -> torch.memory_format:
    """channels-last for reduced precision (where it pays), contiguous NCHW for float32."""
    return torch.contiguous_format if dtype == torch.float32 else torch.channels_last


def prepare_model(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move the model to ``device`` in eval mode with the memory format that suits ``dtype``.

    The weights stay float32: reduced precision comes from autocast, which keeps the precision-
    sensitive operations (GroupNorm statistics, softmax) in float32.
    """
    return model.to(device=device).eval().to(memory_format=memory_format_for(dtype))


def compute_context(
    device: torch.device,
    dtype: torch.dtype,
    *,
    model: torch.nn.Module | None = None,
    budget: int | None = None,
) -> contextlib.AbstractContextManager:
    """Inference mode, the allocator setting and autocast for ``dtype``, as one context; with
    ``model``, also its memory bound (``budget`` bytes, default ``tiling.default_budget()``: large
    images are computed in tiles, with the untiled result)."""
    from .tiling import bounded_memory, default_budget

    stack = contextlib.ExitStack()
    if model is not None:
        stack.enter_context(bounded_memory(model, budget or default_budget()))
    stack.enter_context(torch.inference_mode())
    if device.type == "cpu":
        stack.enter_context(fast_allocator())
    if dtype != torch.float32:
        stack.enter_context(torch.autocast(device_type=device.type, dtype=dtype))
    return stack
