"""Choosing the precision: ``--dtype auto`` measures which reduced precision stays close to float32."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vqcli.speed.context import compute_context, memory_format_for, prepare_model
from vqcli.speed.devices import cpu_has_native_bf16

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
