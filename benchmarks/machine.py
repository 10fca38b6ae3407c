"""Which machine a benchmark ran on: CPU model, cores, bfloat16 matrix units, torch, GPU.

A speed ratio means little without the machine beside it: on a CPU with AMX the bfloat16
convolutions run about 9x float32, on one without bfloat16 units about 2.7x (README, Speed).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

# /proc/cpuinfo flags that decide how fast reduced precision runs on the CPU
BF16_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")


def cpuinfo(text: str | None = None) -> dict:
    """Model name and the flags in ``BF16_FLAGS`` from /proc/cpuinfo (``text``: its contents)."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            text = ""
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return {
        "cpu_model": model or platform.processor() or platform.machine(),
        "cpu_flags": {flag: flag in flags for flag in BF16_FLAGS},
    }


def describe() -> dict:
    """The machine as one JSON-ready dict."""
    info = cpuinfo()
    flags = info["cpu_flags"]
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    out = {
        "cpu_model": info["cpu_model"],
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "amx_bf16": flags["amx_bf16"],
        "avx512_bf16": flags["avx512_bf16"],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "gpus": [],
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out["gpus"].append({
                "name": p.name,
                "memory_gb": round(p.total_memory / 2**30, 1),
                "capability": f"{p.major}.{p.minor}",
            })
    return out


def summary(m: dict) -> str:
    """One line, e.g. 'Intel Xeon ... (2 cores, AMX bf16: no, AVX512-BF16: yes), torch 2.13, GPU: none'."""
    yes = {True: "yes", False: "no"}
    gpu = ", ".join(f"{g['name']} ({g['memory_gb']} GB)" for g in m["gpus"]) or "none"
    cores = f"{m['cpu_cores']} cores" + (f", {m['cpu_cores_usable']} usable" if m["cpu_cores_usable"] != m["cpu_cores"] else "")
    return (
        f"CPU: {m['cpu_model']} ({cores}, AMX bf16: {yes[m['amx_bf16']]}, AVX512-BF16: {yes[m['avx512_bf16']]}, "
        f"{m['cpu_capability']}); torch {m['torch']}" + (f", CUDA {m['cuda']}" if m["cuda"] else "") + f"; GPU: {gpu}"
    )
