"""Choosing the device and dtype to compute on."""

from __future__ import annotations

from pathlib import Path

import torch

from vqcli.errors import UsageError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    A device that is not available is a ``UsageError`` naming it.
    """
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"unknown device {spec!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {spec!r} is not available: this machine has no usable CUDA GPU")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"device {spec!r} is not available: this machine has {count} CUDA device(s)")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"device {spec!r} is not available on this machine")
        return device
    raise UsageError(f"unsupported device {spec!r} (use auto, cpu, cuda, cuda:N or mps)")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """float32, bfloat16 or float16 (CUDA only: CPUs compute it slowly and inexactly); ``auto`` is
    None: the choice needs the model (``accel.choose_dtype``)."""
    if name == "auto":
        return None
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r} (use auto, {', '.join(DTYPES)})")
    if name == "float16" and device.type == "cpu":
        raise UsageError("--dtype float16 needs a GPU; on the CPU use bfloat16 or float32")
    return DTYPES[name]


def _cpu_flags() -> set[str]:
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


def cpu_has_native_bf16() -> bool:
    """True where the CPU executes bfloat16 natively (AVX512-BF16 or AMX), so autocast pays."""
    flags = _cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_has_amx() -> bool:
    """True where the CPU has bfloat16 matrix units (Intel AMX), on which oneDNN's bfloat16
    convolutions run several times faster than with AVX512-BF16 alone."""
    return "amx_bf16" in _cpu_flags()
