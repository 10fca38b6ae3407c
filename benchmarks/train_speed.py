"""Seconds per training step of the embedded models' recipes, channels-last against NCHW.

    python benchmarks/train_speed.py [--runs 3] [--steps 5] [--json]

``vqcli train`` keeps the trained model's maps channels-last under bfloat16 autocast on a CPU with
AMX (``vqcli.train.Trainer``), and normalises them in float32 there
(``vqcli.model.blocks.normalize``); elsewhere in NCHW. This times a step of each phase of
``scripts/train_default_models.sh`` (crop side x crops a step) both ways, whatever the CPU: the
same trainer with its model and batches in one format, then the other (in NCHW ``normalize``
changes nothing). The two run in turn, ``--runs`` times, on the sample images; the median of each is
reported, with the machine. Run it alone: another job on the CPU moves these figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import describe, summary  # noqa: E402

from vqcli.train import TRAIN_PRESETS, ImageBank, Trainer, TrainOptions, image_files  # noqa: E402

PHASES = ((64, 16), (128, 8), (256, 2), (192, 2))  # the recipe's phases 1-3, then the fine-tune


def seconds_per_step(trainer: Trainer, bank: ImageBank, steps: int) -> float:
    for _ in range(2):  # warm-up: oneDNN picks and caches its kernels for these shapes
        trainer.train_step(bank)
    started = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(bank)
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps a measurement")
    parser.add_argument("--models", default="default,default-vq")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = torch.device("cpu")
    bank = ImageBank(image_files([ROOT / "sample_images"]))
    rows = []
    for name in args.models.split(","):
        for crop, batch in PHASES:
            opts = TrainOptions(batch_size=batch, crop=crop, bf16=True, report_every=1000)
            times: dict[str, list[float]] = {"nchw": [], "channels_last": []}
            for _ in range(args.runs):
                for variant in times:
                    trainer = Trainer(TRAIN_PRESETS[name], opts, device)
                    trainer.memory_format = torch.contiguous_format if variant == "nchw" else torch.channels_last
                    trainer.model.to(memory_format=trainer.memory_format)
                    times[variant].append(seconds_per_step(trainer, bank, args.steps))
            before, now = (statistics.median(times[v]) for v in ("nchw", "channels_last"))
            rows.append({"model": name, "crop": crop, "batch": batch, "nchw_s": before, "channels_last_s": now, "speedup": before / now})
            if not args.json:
                print(f"{name:11s} {crop:3d}px x{batch:2d}: NCHW {before:.3f} s, channels-last {now:.3f} s a step: {before / now:.2f}x", flush=True)
    machine = describe()
    if args.json:
        print(json.dumps({"machine": machine, "bf16": True, "runs": args.runs, "steps": args.steps, "rows": rows}, indent=1))
    else:
        print(f"bfloat16 autocast, median of {args.runs} runs in turn, {args.steps} steps each; {summary(machine)}")


if __name__ == "__main__":
    main()
