"""The memory budget of a run: how many bytes one layer's work may take."""

from __future__ import annotations

import torch


def available_memory() -> int:
    """Bytes the kernel says can be allocated without swapping (MemAvailable), or 4 GiB if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


def default_budget(device: torch.device | str | None = None) -> int:
    """The memory one layer's work may take on ``device`` (the CPU when None).

    CPU: a quarter of the host memory available now: the model, the images, the batches waiting
    and other programs need the rest. CUDA: half of what the device has free now, counting what
    PyTorch's caching allocator holds unused (the model's weights are already there). A run takes
    it once, at its start: the heap it keeps between images would otherwise shrink it image by image.
    """
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return max(1, (free + cached) // 2)
    return available_memory() // 4


def parse_size(text: str) -> int:
    """'8GB', '512MiB', '2g', '1000000' to bytes."""
    units = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
             "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}
    s = text.strip().lower().replace(" ", "")
    number = s.rstrip("kmgtib")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not a memory size: {text!r} (e.g. 4GB, 512MB)") from None
    if unit not in units or value <= 0:
        raise ValueError(f"not a memory size: {text!r} (e.g. 4GB, 512MB)")
    return int(value * units[unit])
