"""Where vqcli's reduced-precision GPU time goes: the SD decoder at 1024 px in bfloat16, run as
vqcli runs it (``compute_model``, ``compute_context``) and with one thing changed at a time, and as
vqcli ran it before weights were cast on CUDA (CUDA events, warm-up, median of 10).

    python benchmarks/gpu_variants.py [--size 1024] [--device cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics

import torch

from vqcli import AutoEncoder, AutoEncoderConfig
from vqcli.speed.context import compute_context, compute_model, memory_format_for, prepare_model
from vqcli.speed.tiling import bounded_memory

SD = AutoEncoderConfig(kind="kl", ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4)


def timed(fn, device, reps=10) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            import time

            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    z = torch.randn(1, 4, args.size // 8, args.size // 8, device=device)
    bf16 = torch.bfloat16
    rows = []

    def as_run(model):
        """vqcli's context for ``model``: the memory bound, inference mode, autocast where the
        weights are not cast."""
        return lambda: compute_context(device, bf16, model=model, budget=2**40)

    def autocast_bounded(model):
        """vqcli before weights were cast on CUDA: the float32 model under autocast, bounded."""

        def context():
            stack = contextlib.ExitStack()
            stack.enter_context(bounded_memory(model, 2**40))
            stack.enter_context(torch.inference_mode())
            stack.enter_context(torch.autocast(device_type=device.type, dtype=bf16))
            return stack

        return context

    def bare():
        return torch.inference_mode()

    def variant(name, model, context, *, fmt=memory_format_for(bf16, device), input_dtype=torch.float32):
        zin = z.to(input_dtype).contiguous(memory_format=fmt)

        def run():
            with context():
                model.decode(zin)

        rows.append((name, timed(run, device)))

    base = prepare_model(AutoEncoder(SD), device, bf16)
    runner = compute_model(base, device, bf16)  # (on the CPU: ``base`` itself, run under autocast)
    variant("vqcli as run (compute_model: bf16 weights, output layers fp32; NCHW, bounded, PhaseUpsample)",
            runner, as_run(runner))
    variant("no bounded_memory context", runner, bare)
    nhwc = compute_model(copy.deepcopy(base), device, bf16).to(memory_format=torch.channels_last)
    variant("NHWC", nhwc, as_run(nhwc), fmt=torch.channels_last)
    before = copy.deepcopy(base).to(memory_format=torch.channels_last)
    variant("vqcli before (fp32 weights, autocast, NHWC, bounded, PhaseUpsample)", before, autocast_bounded(before),
            fmt=torch.channels_last)
    plain = AutoEncoder(SD).to(device).eval()  # (no fast paths)
    plain.load_state_dict(base.state_dict())
    plain_runner = compute_model(plain, device, bf16)
    variant("plain Upsample (no fast path)", plain_runner, as_run(plain_runner))
    variant("plain Upsample, no bounded", plain_runner, bare)
    cast = copy.deepcopy(plain).to(bf16)
    variant("all weights bf16, no autocast, plain, NCHW, no bounded (diffusers' way)", cast, bare,
            fmt=torch.contiguous_format, input_dtype=bf16)
    variant("all weights bf16, no autocast, plain, NHWC, no bounded", copy.deepcopy(cast).to(memory_format=torch.channels_last),
            bare, fmt=torch.channels_last, input_dtype=bf16)
    print(f"| variant (SD decoder, {args.size} px, bfloat16, {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}) | ms |")
    print("|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} |")


if __name__ == "__main__":
    main()
