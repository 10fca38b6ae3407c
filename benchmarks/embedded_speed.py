"""Encode + decode of one 512x512 photograph with the embedded models: seconds, best of N.

    python benchmarks/embedded_speed.py [--repeat 3] [--size 512]

Runs the same code path as the CLI (vqcli.pipeline.encode.encode_array / decode.decode_array: inference mode, the
allocator setting, autocast for bfloat16, the memory bound) in float32 and bfloat16, twice: "in a
run" is an image of a CLI run past its first, whose heap the run keeps paged in
(accel.fast_allocator, held from the first image to the last); "alone" is the library called for
one image, which gives the heap back after each call and so pays its page faults every time. The
machine's 3x3 convolution peak is timed in the same run (as in bench.py), with the GFLOP/s each
model achieves (FLOPs counted by torch.utils.flop_counter): a slow machine state shows there. The
counter does not count PyTorch's CPU attention kernel, so default-vq's middle attention (137 GFLOP
in each coder at 512 px) is missing from its figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import machine_peak  # noqa: E402

from vqcli.checkpoints.load import resolve_model
from vqcli.io.images import load_image
from vqcli.pipeline.decode import decode_array
from vqcli.pipeline.encode import encode_array
from vqcli.speed.devices import cpu_has_native_bf16
from vqcli.speed.heap import fast_allocator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    rgb = load_image(ROOT / "sample_images" / "astronaut.png")[: args.size, : args.size]
    dtypes = [torch.float32] + ([torch.bfloat16] if cpu_has_native_bf16() else [])
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, image {rgb.shape[1]}x{rgb.shape[0]}")
    peak = machine_peak(threads)
    print("3x3 convolution peak: " + ", ".join(f"{d} {peak[f'conv3x3_{d}']:.0f} GFLOP/s" for d in ("float32", "bfloat16")))
    print(f"| model | dtype | in a run, s (best of {args.repeat}) | alone, s | GFLOP | GFLOP/s in a run | of the conv peak |")
    print("|---|---|---|---|---|---|---|")
    for name in ("default", "default-vq"):
        for dtype in dtypes:
            model = resolve_model(name, device=torch.device("cpu"), dtype=dtype)

            def roundtrip():
                decode_array(model, encode_array(model, rgb, dtype=dtype), rgb.shape[0], rgb.shape[1], dtype=dtype)

            with FlopCounterMode(display=False) as counter:
                roundtrip()  # (also the warm-up)
            gflop = counter.get_total_flops() / 1e9
            alone = best_of(args.repeat, roundtrip)
            with fast_allocator():
                roundtrip()  # a run's first image pages the heap in
                in_run = best_of(args.repeat, roundtrip)
            d = str(dtype).removeprefix("torch.")
            rate = gflop / in_run
            share = rate / peak[f"conv3x3_{d}"]
            print(f"| {name} | {d} | {in_run:.2f} | {alone:.2f} | {gflop:.0f} | {rate:.0f} | {share:.0%} |", flush=True)


def best_of(repeat: int, fn) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


if __name__ == "__main__":
    main()
