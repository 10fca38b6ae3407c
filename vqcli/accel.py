"""The inference fast path: allocator settings, memory format and reduced precision.

Each piece was measured (see benchmarks/) and is kept because it pays:

- ``fast_allocator``: the activations of these networks are tens to hundreds of MB. glibc serves
  such blocks with mmap and unmaps them on free, so every layer's output is page-faulted in afresh:
  a third of the process time went to the kernel. Inside this context glibc keeps freed memory
  in its heap (no mmap for large blocks, no trimming), so after the first image no page faults
  remain. The previous settings are restored and the heap trimmed on exit. A no-op off glibc.
  A run over many images (``vqcli.pipeline``) holds it from the first image to the last: with
  only each image's ``compute_context`` holding it, the heap was trimmed after every image and
  each one paid the faults afresh (``default`` at 512 px: 227,000 faults an image; none after the
  first with the heap held). ``release_heap_above`` bounds what a run keeps.
  Images computed in bands (``vqcli.tiling``) switch this off again (``bounded_allocator``): there
  the memory bound comes first.
- channels-last memory format with bfloat16: oneDNN's bf16 convolutions run about twice as fast
  in NHWC; in float32 NHWC did not pay on this CPU, so float32 stays NCHW.
- bfloat16 autocast keeps GroupNorm statistics in float32 (PyTorch's CPU and CUDA autocast
  policies run group_norm in float32).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

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
    within ``fast_allocator`` too: for images computed in bands (``vqcli.tiling``), where the memory
    bound matters more than page faults. Bands of many sizes leave holes in a heap that keeps what
    is freed, and the process grows far past its budget: the SD decoder at 512 px in bands of a
    200 MB budget grew by 318 MB with glibc's own settings, by 400 MB and more inside
    ``fast_allocator``, by 214 MB inside this (4096 px at a 5.7 GB budget: 13 GB before)."""
    if _LIBC is None:
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
    compile: bool = False,
) -> contextlib.AbstractContextManager:
    """Inference mode, the allocator setting and autocast for ``dtype``, as one context; with
    ``model``, also its memory bound (``budget`` bytes, default ``tiling.default_budget()``: large
    images are computed in tiles, with the untiled result), and with ``compile`` its coders'
    torch.compile'd forms where an image fits whole."""
    from .tiling import bounded_memory, default_budget

    stack = contextlib.ExitStack()
    if model is not None:
        stack.enter_context(bounded_memory(model, budget or default_budget(), compile=compile))
    stack.enter_context(torch.inference_mode())
    if device.type == "cpu":
        stack.enter_context(fast_allocator())
    if dtype != torch.float32:
        stack.enter_context(torch.autocast(device_type=device.type, dtype=dtype))
    return stack


# --- choosing the precision ---------------------------------------------------------------------

AUTO_MIN_PSNR = 40.0  # dB: how close to float32 a reduced precision must stay to be chosen


@dataclass(frozen=True)
class DtypeChoice:
    """What ``--dtype auto`` chose, and the measurements it chose from (per dtype name)."""

    dtype: torch.dtype
    psnr: dict[str, float]  # dB from the float32 result on the check image (inf for float32 itself)
    seconds: dict[str, float]  # one encode + decode of the check image

    def describe(self) -> str:
        name = str(self.dtype).removeprefix("torch.")
        if self.dtype == torch.float32:
            others = ", ".join(f"{k} {v:.1f} dB" for k, v in self.psnr.items() if k != "float32")
            return f"--dtype auto: float32 ({others or 'no faster precision on this device'})"
        ratio = self.seconds["float32"] / self.seconds[name]
        return f"--dtype auto: {name} ({self.psnr[name]:.1f} dB from float32 on the check image, {ratio:.1f}x faster)"


def auto_candidates(device: torch.device) -> list[torch.dtype]:
    """The reduced precisions worth trying on ``device``: bfloat16 where the hardware runs it
    natively (CUDA with bf16 support, CPUs with AVX512-BF16 or AMX), float16 on CUDA."""
    from .devices import cpu_has_native_bf16

    if device.type == "cuda":
        found = [torch.bfloat16] if torch.cuda.is_bf16_supported() else []
        return found + [torch.float16]
    if device.type == "cpu" and cpu_has_native_bf16():
        return [torch.bfloat16]
    return []


def check_image(size: int, factor: int) -> torch.Tensor:
    """A deterministic test picture (1, 3, S, S) in [-1, 1]: smooth colour gradients, hard-edged
    discs and fine texture, so that reduced precision is tried on what photographs contain."""
    side = max(factor, size - size % factor)
    gen = torch.Generator().manual_seed(0)
    t = torch.linspace(0.0, 1.0, side)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    img = torch.stack([0.2 + 0.6 * xx, 0.3 + 0.5 * yy * xx, 0.8 - 0.6 * yy])
    for _ in range(6):
        cy, cx, r = torch.rand(3, generator=gen).tolist()
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2) < (0.05 + 0.2 * r) ** 2
        img = torch.where(disc, torch.rand(3, 1, 1, generator=gen), img)
    noise = torch.nn.functional.avg_pool2d(torch.rand(1, 3, side, side, generator=gen), 3, 1, 1)[0]
    img = img + 0.15 * (noise - 0.5)
    return (img.clamp(0.0, 1.0) * 2.0 - 1.0).unsqueeze(0)


def choose_dtype(model, device: torch.device, *, size: int = 128, candidates: list[torch.dtype] | None = None) -> DtypeChoice:
    """``--dtype auto``: the fastest precision whose encode + decode of ``check_image`` stays within
    ``AUTO_MIN_PSNR`` dB of float32 (non-finite output disqualifies). Each precision runs twice
    and the second run is timed (the first pays for warm-up). Leaves ``model`` prepared for the
    precision chosen."""
    import time

    candidates = auto_candidates(device) if candidates is None else candidates
    if not candidates:
        return DtypeChoice(torch.float32, {"float32": math.inf}, {})
    x = check_image(size, model.config.downsampling).to(device)

    def roundtrip(dtype: torch.dtype) -> tuple[torch.Tensor, float]:
        prepare_model(model, device, dtype)
        xin = x.contiguous(memory_format=memory_format_for(dtype))
        for _ in range(2):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            with compute_context(device, dtype, model=model):
                if model.config.kind == "vq":
                    y = model.decode_indices(model.encode_indices(xin))
                else:
                    y = model.decode(model.encode(xin))
            y = y.float().cpu()
            seconds = time.perf_counter() - started
        return y, seconds

    reference, fp32_seconds = roundtrip(torch.float32)
    psnr, seconds = {"float32": math.inf}, {"float32": fp32_seconds}
    best, best_seconds = torch.float32, fp32_seconds
    for dtype in candidates:
        name = str(dtype).removeprefix("torch.")
        y, took = roundtrip(dtype)
        seconds[name] = took
        if not bool(torch.isfinite(y).all()):
            psnr[name] = -math.inf
            continue
        mse = float(((y.clamp(-1, 1) - reference.clamp(-1, 1)) / 2).pow(2).mean())
        psnr[name] = math.inf if mse == 0 else -10.0 * math.log10(mse)
        if psnr[name] >= AUTO_MIN_PSNR and took < best_seconds:
            best, best_seconds = dtype, took
    prepare_model(model, device, best)
    return DtypeChoice(best, psnr, seconds)
