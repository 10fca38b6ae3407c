"""Encode + decode of one 512x512 photograph with the embedded models: seconds, best of N.

    python benchmarks/embedded_speed.py [--repeat 3] [--size 512]

Runs the same code path as the CLI (vqcli.pipeline.encode_array / decode_array: inference mode,
the allocator setting, autocast for bfloat16, the memory bound) in float32 and bfloat16. The
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
from vqcli.devices import cpu_has_native_bf16  # noqa: E402
from vqcli.images import load_image  # noqa: E402
from vqcli.models import resolve_model  # noqa: E402
from vqcli.pipeline import decode_array, encode_array  # noqa: E402


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
    print("| model | dtype | encode + decode, s (best of %d) | GFLOP | GFLOP/s | of the conv peak |" % args.repeat)
    print("|---|---|---|---|---|---|")
    for name in ("default", "default-vq"):
        for dtype in dtypes:
            model = resolve_model(name, device=torch.device("cpu"), dtype=dtype)
            with FlopCounterMode(display=False) as counter:
                decode_array(model, encode_array(model, rgb, dtype=dtype), rgb.shape[0], rgb.shape[1], dtype=dtype)
            gflop = counter.get_total_flops() / 1e9
            best = float("inf")
            for _ in range(args.repeat + 1):  # the first run warms up
                start = time.perf_counter()
                decode_array(model, encode_array(model, rgb, dtype=dtype), rgb.shape[0], rgb.shape[1], dtype=dtype)
                best = min(best, time.perf_counter() - start)
            d = str(dtype).removeprefix("torch.")
            rate = gflop / best
            print(f"| {name} | {d} | {best:.2f} | {gflop:.0f} | {rate:.0f} | {rate / peak[f'conv3x3_{d}']:.0%} |", flush=True)


if __name__ == "__main__":
    main()
