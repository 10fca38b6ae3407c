"""Where vqcli's reduced-precision GPU time goes: the SD decoder at 1024 px in bfloat16, run as
vqcli runs it and with one thing changed at a time (CUDA events, warm-up, median of 10).

    python benchmarks/gpu_variants.py [--size 1024] [--device cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import torch

from vqcli import AutoEncoder, AutoEncoderConfig
from vqcli.speed.context import compute_context, memory_format_for, prepare_model

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

    def variant(name, model, *, autocast=True, bounded=True, fmt=torch.channels_last, weights_dtype=None):
        zin = z.to(weights_dtype or torch.float32).contiguous(memory_format=fmt)

        def run():
            stack = contextlib.ExitStack()
            if bounded:
                stack.enter_context(compute_context(device, bf16 if autocast else torch.float32, model=model, budget=2**40))
            else:
                stack.enter_context(torch.inference_mode())
                if autocast:
                    stack.enter_context(torch.autocast(device_type=device.type, dtype=bf16))
            with stack:
                model.decode(zin)

        rows.append((name, timed(run, device)))

    base = prepare_model(AutoEncoder(SD), device, bf16)
    variant("vqcli as run (fp32 weights, autocast, NHWC, bounded, PhaseUpsample)", base)
    variant("no bounded_memory context", base, bounded=False)
    variant("NCHW", base, fmt=torch.contiguous_format)
    plain = AutoEncoder(SD).to(device).eval().to(memory_format=memory_format_for(bf16))
    plain.load_state_dict(base.state_dict())
    variant("plain Upsample (no fast path)", plain)
    variant("plain Upsample, NCHW, no bounded", plain, bounded=False, fmt=torch.contiguous_format)
    cast = AutoEncoder(SD).to(device).eval()
    cast.load_state_dict(base.state_dict())
    cast = cast.to(bf16)
    variant("bf16 weights, no autocast, plain, NCHW, no bounded (diffusers' way)", cast, autocast=False, bounded=False,
            fmt=torch.contiguous_format, weights_dtype=bf16)
    variant("bf16 weights, no autocast, plain, NHWC, no bounded", cast.to(memory_format=torch.channels_last), autocast=False,
            bounded=False, weights_dtype=bf16)
    print(f"| variant (SD decoder, {args.size} px, bfloat16, {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}) | ms |")
    print("|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} |")


if __name__ == "__main__":
    main()
