"""Would a Winograd convolution in PyTorch operations beat oneDNN's float32 3x3 convolution?

    python benchmarks/winograd_probe.py [--channels 128] [--size 512] [--runs 5] [--json]

vqcli's float32 encode and decode spend most of their time in 3x3 convolutions that oneDNN already
runs at about the CPU's float32 peak (benchmarks/README.md), so only fewer multiply-adds could make
them faster. Winograd's F(m x m, 3x3) computes an m x m output tile with (m+2)^2 multiplies per
channel pair instead of 9 m^2 (2.25x fewer for m = 2, 4x for m = 4), at the price of transforming
every input and output tile. Here the transforms are small matrix products over bands of tile rows
(so that a band's transformed tiles stay in cache) and the multiplies one batched matrix product.
Both forms are timed in turn against ``torch.nn.functional.conv2d`` on one map, ``--runs`` times,
the median reported, with each form's largest error against a float64 convolution (relative to the
largest output). It is a probe, not part of vqcli: the README says what it found. Run it alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe, summary  # noqa: E402

# B^T (input), G (kernel) and A^T (output) transforms of F(2x2, 3x3) and F(4x4, 3x3), points 0, +-1, +-2
TRANSFORMS = {
    2: {
        "BT": [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        "G": [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
        "AT": [[1, 1, 1, 0], [0, 1, -1, -1]],
    },
    4: {
        "BT": [
            [4, 0, -5, 0, 1, 0],
            [0, -4, -4, 1, 1, 0],
            [0, 4, -4, -1, 1, 0],
            [0, -2, -1, 2, 1, 0],
            [0, 2, -1, -2, 1, 0],
            [0, 4, 0, -5, 0, 1],
        ],
        "G": [
            [1 / 4, 0, 0],
            [-1 / 6, -1 / 6, -1 / 6],
            [-1 / 6, 1 / 6, -1 / 6],
            [1 / 24, 1 / 12, 1 / 6],
            [1 / 24, -1 / 12, 1 / 6],
            [0, 0, 1],
        ],
        "AT": [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    },
}


class WinogradConv:
    """A 3x3 convolution (stride 1, padding 1) of a float32 NCHW map by F(m x m, 3x3)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, m: int, band: int):
        mats = {k: torch.tensor(v, dtype=torch.float64) for k, v in TRANSFORMS[m].items()}
        self.m, self.tile, self.band = m, m + 2, band
        kernel = torch.einsum("ak,oikl,bl->aboi", mats["G"], weight.double(), mats["G"])
        self.kernel = kernel.reshape(self.tile**2, *weight.shape[:2]).float().contiguous()
        self.input_transform = torch.kron(mats["BT"], mats["BT"]).float()
        self.output_transform = torch.kron(mats["AT"], mats["AT"]).float()
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m, tile = self.m, self.tile
        n, c, h, w = x.shape
        if h % m or w % m:
            raise ValueError(f"the map's sides ({h}x{w}) must be multiples of {m}")
        c_out, rows, cols = self.kernel.shape[1], h // m, w // m
        padded = F.pad(x, (1, 1, 1, 1))
        y = torch.empty(n, c_out, h, w)
        for i in range(n):
            for r0 in range(0, rows, self.band):
                nb = min(rows, r0 + self.band) - r0
                tiles = padded[i, :, m * r0 : m * (r0 + nb) + 2].unfold(1, tile, m).unfold(2, tile, m)
                d = tiles.permute(3, 4, 0, 1, 2).reshape(tile * tile, c * nb * cols)
                v = (self.input_transform @ d).view(tile * tile, c, nb * cols)
                products = torch.bmm(self.kernel, v).view(tile * tile, c_out * nb * cols)
                out = (self.output_transform @ products).view(m, m, c_out, nb, cols)
                y[i, :, m * r0 : m * (r0 + nb)].view(c_out, nb, m, cols, m).copy_(out.permute(2, 3, 0, 4, 1))
        return y.add_(self.bias.view(1, -1, 1, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=128, help="input and output channels (128: SD's full-resolution width)")
    parser.add_argument("--size", type=int, default=512, help="the map's side")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    c = args.channels
    x = torch.randn(1, c, args.size, args.size, generator=gen)
    weight = torch.randn(c, c, 3, 3, generator=gen) / (9 * c) ** 0.5
    bias = torch.randn(c, generator=gen)
    reference = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    forms = {"oneDNN direct": lambda t: F.conv2d(t, weight, bias, padding=1)}
    for m, bands in ((2, (4, 16)), (4, (2, 8))):
        for band in bands:
            forms[f"F({m}x{m},3x3), bands of {band} tile rows"] = WinogradConv(weight, bias, m, band)

    times: dict[str, list[float]] = {name: [] for name in forms}
    errors = {}
    with torch.inference_mode():
        for name, conv in forms.items():  # warm-up, and each form's error
            errors[name] = float((conv(x).double() - reference).abs().max() / reference.abs().max())
        for _ in range(args.runs):
            for name, conv in forms.items():
                started = time.perf_counter()
                conv(x)
                times[name].append(time.perf_counter() - started)

    base = statistics.median(times["oneDNN direct"])
    rows = [
        {"form": name, "seconds": statistics.median(t), "speedup": base / statistics.median(t), "rel_error": errors[name]}
        for name, t in times.items()
    ]
    machine = describe()
    if args.json:
        print(json.dumps({"machine": machine, "channels": c, "size": args.size, "runs": args.runs, "rows": rows}, indent=2))
        return
    print(summary(machine))
    print(f"3x3 convolution, {c} -> {c} channels, {args.size}x{args.size}, float32, median of {args.runs} runs in turn")
    for r in rows:
        print(f"  {r['form']:<38} {r['seconds'] * 1000:7.0f} ms  {r['speedup']:.2f}x  error {r['rel_error']:.1e}")


if __name__ == "__main__":
    main()
