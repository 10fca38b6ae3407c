"""Large images in bounded memory: seconds and peak RSS of tiled against untiled encode and decode.

    python benchmarks/large_images.py                          # default and tiny, 1024 2048 4096
    python benchmarks/large_images.py --model sd --sizes 1024 2048
    python benchmarks/large_images.py --model tiny --sizes 4096 --budget 2GB

Each measurement runs in a fresh process, which reports its own peak RSS (VmHWM from
/proc/self/status: the high-water mark of that process alone, which ru_maxrss is not for a child of
a large parent). The model runs exactly as in the CLI: vqcli.speed.context.compute_context (inference mode,
the allocator setting, the memory bound), float32. "untiled" is the same with an unlimited budget;
it is skipped where its estimated memory would exceed half the free memory. Where both ran, the
table gives the mean and largest absolute difference between their outputs (decode: the image,
in 8-bit levels (1 = 1/255); encode: the encoder's moments). CPU seconds are the process's own (on a
busy machine, a steadier measure of the work than the wall clock).

Models (random weights with a fixed seed; time and memory do not depend on the values):
  default   vqcli's embedded default architecture (train.TRAIN_PRESETS["default"]); with
            --weights, the embedded weights themselves
  default-vq  the same for the VQ default
  sd        the Stable Diffusion VAE architecture (ch 128, ch_mult 1,2,4,4, 2 blocks, z 4)
  tiny      ch 32, f32 (six levels): the model of tests/test_large_images.py

The middle attention block runs whole, at the latent resolution, and its cost grows with the
square of the number of latent positions: an f4 model at 4096x4096 px has 1M of them (hours on a
2-core CPU); the script prints the count and skips sizes over --max-tokens (default 300k).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

UNLIMITED = 2**62


def _config(name: str):
    from vqcli import AutoEncoderConfig
    from vqcli.train import TRAIN_PRESETS

    if name in TRAIN_PRESETS:
        return TRAIN_PRESETS[name]
    if name == "sd":
        return AutoEncoderConfig(kind="kl", ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4)
    if name == "tiny":
        return AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 1, 1, 1, 1, 1), num_res_blocks=1, z_channels=4)
    raise SystemExit(f"unknown model {name!r} (default, default-vq, sd, tiny)")


def _peak_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def child(spec: dict) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    from vqcli import AutoEncoder
    from vqcli.speed.context import compute_context

    torch.manual_seed(0)
    if spec["weights"]:
        from vqcli.checkpoints.load import resolve_model

        model = resolve_model(spec["model"], device=torch.device("cpu"), dtype=torch.float32)
    else:
        model = AutoEncoder(_config(spec["model"])).eval()
    config = model.config
    size, f = spec["size"], config.downsampling
    gen = torch.Generator().manual_seed(1)
    if spec["op"] == "decode":
        x = torch.randn(1, config.latent_channels, size // f, size // f, generator=gen)
        fn = model.decode
    else:
        x = torch.rand(1, 3, size, size, generator=gen) * 2 - 1
        fn = model.encode_moments
    base = _peak_kb()
    start, cpu = time.perf_counter(), time.process_time()
    with compute_context(torch.device("cpu"), torch.float32, model=model, budget=spec["budget"]):
        y = fn(x)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = _peak_kb()
    if spec["op"] == "decode":
        y = (y.clamp(-1, 1) + 1) * 0.5
    if spec["out"]:
        np.save(spec["out"], y.numpy())
    return {"seconds": seconds, "cpu": cpu, "peak_gb": peak / 2**20, "growth_gb": (peak - base) / 2**20}


def _available() -> int:
    from vqcli.speed.budget import available_memory

    return available_memory()


def _untiled_bytes(config, size: int, op: str) -> int:
    """Rough untiled peak (to skip untiled runs that cannot fit): seven maps of the largest level, plus the output."""
    widest = max(config.ch * m / 4**i for i, m in enumerate(config.ch_mult))
    return int(7 * widest * size * size * 4 + 3 * size * size * 4 * 2)


def _compare(a: Path, b: Path) -> tuple[float, float]:
    x, y = np.load(a, mmap_mode="r"), np.load(b, mmap_mode="r")
    total, most, n = 0.0, 0.0, 0
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    step = 1 << 24
    for i in range(0, flat_x.size, step):
        d = np.abs(flat_x[i : i + step].astype(np.float64) - flat_y[i : i + step])
        total, most, n = total + d.sum(), max(most, float(d.max())), n + d.size
    return total / n, most


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["default", "tiny"])
    parser.add_argument("--weights", action="store_true", help="the embedded weights (default, default-vq)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--ops", nargs="+", default=["decode", "encode"], choices=["decode", "encode"])
    parser.add_argument("--budget", default=None, help="--max-memory for the tiled runs (default: auto)")
    parser.add_argument("--max-tokens", type=int, default=300_000, help="skip sizes whose middle attention has more positions")
    parser.add_argument("--no-untiled", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the measuring processes")
    args = parser.parse_args()

    from vqcli.speed.budget import parse_size

    budget = parse_size(args.budget) if args.budget else None
    for name in args.model:
        _run_model(name, args, budget)


def _run_model(name: str, args, budget: int | None) -> None:
    from vqcli.speed.budget import default_budget

    config = _config(name) if not args.weights else None
    if config is None:
        from vqcli.checkpoints.load import resolve_model

        config = resolve_model(name).config
    f = config.downsampling
    print(f"model {name} ({'embedded weights' if args.weights else 'random weights'}): ch {config.ch}, "
          f"ch_mult {config.ch_mult}, {config.num_res_blocks} blocks, f{f}; {os.cpu_count()} CPUs; "
          f"free memory {_available() / 2**30:.1f} GB, auto budget {default_budget() / 2**30:.1f} GB")
    print("| op | size | mode | budget | seconds | CPU seconds | peak RSS, GB | growth, GB | mean abs diff | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            tokens = (size // f) ** 2
            if tokens > args.max_tokens:
                print(f"| | {size} | skipped: middle attention over {tokens} positions (--max-tokens) | | | | | | |")
                continue
            for op in args.ops:
                outs = {}
                modes = [("tiled", budget)]
                if not args.no_untiled:
                    if _untiled_bytes(config, size, op) < 0.5 * _available():
                        modes.insert(0, ("untiled", UNLIMITED))
                    else:
                        print(f"| {op} | {size} | untiled: skipped, needs about "
                              f"{_untiled_bytes(config, size, op) / 2**30:.1f} GB | | | | | | |")
                for mode, b in modes:
                    out = Path(tmp) / f"{op}-{size}-{mode}.npy"
                    spec = {"model": name, "weights": args.weights, "size": size, "op": op, "budget": b,
                            "out": str(out)}
                    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
                    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                                          capture_output=True, text=True, env=env)
                    if proc.returncode != 0:
                        print(f"| {op} | {size} | {mode} | failed: {proc.stderr.strip().splitlines()[-1:]} |")
                        continue
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                    outs[mode] = out
                    diff = ""
                    if mode == "tiled" and "untiled" in outs:
                        mad, most = _compare(outs["untiled"], out)
                        scale = 255 if op == "decode" else 1  # decode: in 8-bit levels
                        diff = f"| {mad * scale:.2e} | {most * scale:.2e}"
                    shown = "-" if b == UNLIMITED else (args.budget or f"auto ({default_budget() / 2**30:.1f} GB)")
                    print(f"| {op} | {size} | {mode} | {shown} | {r['seconds']:.1f} | {r['cpu']:.1f} | {r['peak_gb']:.2f} | "
                          f"{r['growth_gb']:.2f} {diff or '| |'} |", flush=True)
                for out in outs.values():
                    out.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
