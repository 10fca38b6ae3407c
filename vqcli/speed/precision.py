"""Choosing the precision: ``--dtype auto`` measures which reduced precision stays close to float32."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vqcli.speed.context import compute_context, compute_model, memory_format_for, prepare_model
from vqcli.speed.heap import fast_allocator

AUTO_MIN_PSNR = 40.0  # dB: how close to float32 a reduced precision must stay to be chosen
AUTO_MIN_GAIN = 1.1  # a reduced precision must be at least this much faster than float32 to be chosen
AUTO_ROUNDS = 2  # timed calls of each precision, in turns, after an untimed first call of each


@dataclass(frozen=True)
class DtypeChoice:
    """What ``--dtype auto`` chose, and the measurements it chose from (per dtype name)."""

    dtype: torch.dtype
    psnr: dict[str, float]  # dB from the float32 result on the check image (inf for float32 itself)
    seconds: dict[str, float]  # one encode + decode of the check image

    def describe(self) -> str:
        name = str(self.dtype).removeprefix("torch.")
        if self.dtype == torch.float32:
            others = ", ".join(f"{k} {v:.1f} dB" + (f", {self.seconds['float32'] / self.seconds[k]:.2f}x" if self.seconds.get(k) else "")
                               for k, v in self.psnr.items() if k != "float32")
            return f"--dtype auto: float32 ({others or 'no faster precision on this device'})"
        ratio = self.seconds["float32"] / self.seconds[name]
        return f"--dtype auto: {name} ({self.psnr[name]:.1f} dB from float32 on the check image, {ratio:.1f}x faster)"


def auto_candidates(device: torch.device) -> list[torch.dtype]:
    """The reduced precisions worth measuring on ``device``: bfloat16 (where the GPU supports it)
    and float16 on CUDA; bfloat16 on every CPU, with bfloat16 matrix units (AMX, AVX512-BF16) or
    without: oneDNN's bfloat16 convolutions still paid on a 2-core AMD EPYC without them (about
    2.7x its float32 peak), and on a CPU where they do not, the measurement keeps float32."""
    if device.type == "cuda":
        found = [torch.bfloat16] if torch.cuda.is_bf16_supported() else []
        return found + [torch.float16]
    if device.type == "cpu":
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


def choose_dtype(
    model,
    device: torch.device,
    *,
    size: int = 128,
    candidates: list[torch.dtype] | None = None,
    rounds: int = AUTO_ROUNDS,
    clock: Callable[[], float] = time.perf_counter,
) -> DtypeChoice:
    """``--dtype auto``: the fastest precision whose encode + decode of ``check_image`` stays within
    ``AUTO_MIN_PSNR`` dB of float32 (non-finite output disqualifies), a reduced one only where it
    is at least ``AUTO_MIN_GAIN`` times as fast as float32. Leaves ``model`` prepared for the
    precision chosen. Each precision runs the model as a run does (``compute_model``: on CUDA,
    reduced precision runs a copy with cast weights).

    What the timing guards against. A precision's first call pays for its warm-up (the kernels'
    choice and setup in oneDNN or cuDNN, the heap growing to the work's size): it runs once
    untimed. The timed calls run with the heap kept, as in a run (``heap.fast_allocator``):
    otherwise each call pays its page faults afresh, float32, with twice bfloat16's memory, twice
    as many. The precisions then take turns for ``rounds`` rounds, the fastest call of each
    counting, so that a machine whose speed drifts (a shared host) favours none of them.
    ``clock``: seconds, for the timing (tests give a fake one)."""
    candidates = auto_candidates(device) if candidates is None else candidates
    if not candidates:
        return DtypeChoice(torch.float32, {"float32": math.inf}, {})
    x = check_image(size, model.config.downsampling).to(device)
    dtypes = [torch.float32, *candidates]
    names = {dtype: str(dtype).removeprefix("torch.") for dtype in dtypes}
    runners: dict[torch.dtype, torch.nn.Module] = {}  # (cast copies made once: the cache keeps one)

    def roundtrip(dtype: torch.dtype) -> tuple[torch.Tensor, float]:
        prepare_model(model, device, dtype)
        if dtype not in runners:
            runners[dtype] = compute_model(model, device, dtype)
        runner = runners[dtype]
        xin = x.contiguous(memory_format=memory_format_for(dtype, device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = clock()
        with compute_context(device, dtype, model=runner):
            if model.config.kind == "vq":
                y = runner.decode_indices(runner.encode_indices(xin))
            else:
                y = runner.decode(runner.encode(xin))
        y = y.float().cpu()  # (waits for the device)
        return y, clock() - started

    with fast_allocator() if device.type == "cpu" else contextlib.nullcontext():
        outputs = {dtype: roundtrip(dtype)[0] for dtype in dtypes}  # the untimed first calls
        seconds = {names[dtype]: math.inf for dtype in dtypes}
        for _ in range(rounds):
            for dtype in dtypes:
                seconds[names[dtype]] = min(seconds[names[dtype]], roundtrip(dtype)[1])
    runners.clear()  # (the cast copies: the run makes the one it needs)
    reference = outputs[torch.float32]
    psnr = {"float32": math.inf}
    best = torch.float32
    for dtype in candidates:
        name, y = names[dtype], outputs[dtype]
        mse = float(((y.clamp(-1, 1) - reference.clamp(-1, 1)) / 2).pow(2).mean())
        if not bool(torch.isfinite(y).all()):
            psnr[name] = -math.inf
        else:
            psnr[name] = math.inf if mse == 0 else -10.0 * math.log10(mse)
        fast_enough = seconds[name] * AUTO_MIN_GAIN <= seconds["float32"]
        if psnr[name] >= AUTO_MIN_PSNR and fast_enough and seconds[name] < seconds[names[best]]:
            best = dtype
    prepare_model(model, device, best)
    return DtypeChoice(best, psnr, seconds)
