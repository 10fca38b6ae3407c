"""Encode and decode large images in bounded memory, with exactly the untiled result.

Where the memory goes: inside a residual block at full resolution, four or five activations of the
image's size are alive at once (the input kept for the shortcut, the normalised copy, the first
convolution's output, the second's, the sum). ``bounded_memory`` runs every large residual block
and upsampling layer tile by tile instead, so that only the block's input and its output exist at
full size, plus one tile's worth of temporaries:

- each tile is computed with a halo of one pixel per 3x3 convolution and only its core is kept, so
  the convolutions see exactly the pixels they see untiled;
- GroupNorm uses the statistics of the whole image, never of one tile (per-tile statistics cause
  seams and tone shifts between tiles): the first norm's statistics are taken from the whole input,
  which is at hand; the second norm's, which depend on the first convolution everywhere, are
  gathered over the cores of all tiles in a first pass that computes only that convolution.

The result equals the untiled network up to float rounding (tests/test_tiling.py). The cost is the
first convolution of each tiled block computed twice. Attention blocks (the middle one, at the
latent resolution) run whole, with the memory-efficient attention kernel.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .blocks import ResnetBlock, Upsample, norm_swish

log = logging.getLogger(__name__)

LIVE_TENSORS = 5  # activations alive at once in an untiled residual block


@dataclass(frozen=True)
class Tile:
    """A rectangle of a feature map: the extent computed (core plus halo) and the core kept."""

    y0: int
    y1: int
    x0: int
    x1: int
    core_y0: int
    core_y1: int
    core_x0: int
    core_x1: int

    def source(self, t: torch.Tensor) -> torch.Tensor:
        return t[:, :, self.y0 : self.y1, self.x0 : self.x1]

    def core_of(self, t: torch.Tensor, scale: int = 1) -> torch.Tensor:
        """The core of a tile-shaped result (``scale`` times the tile's size)."""
        return t[
            :,
            :,
            (self.core_y0 - self.y0) * scale : (self.core_y1 - self.y0) * scale,
            (self.core_x0 - self.x0) * scale : (self.core_x1 - self.x0) * scale,
        ]

    def core_in(self, t: torch.Tensor, scale: int = 1) -> torch.Tensor:
        """Where the core goes in a whole-image result ``scale`` times the source's size."""
        return t[:, :, self.core_y0 * scale : self.core_y1 * scale, self.core_x0 * scale : self.core_x1 * scale]


def tiles(height: int, width: int, size: int, halo: int) -> list[Tile]:
    """Cover a (height, width) map with cores of ``size`` pixels and halos of ``halo``."""
    out = []
    for cy in range(0, height, size):
        for cx in range(0, width, size):
            cy1, cx1 = min(cy + size, height), min(cx + size, width)
            out.append(
                Tile(max(0, cy - halo), min(height, cy1 + halo), max(0, cx - halo), min(width, cx1 + halo), cy, cy1, cx, cx1)
            )
    return out


# --- whole-image GroupNorm statistics --------------------------------------------------------


class _Stats:
    """Count, mean and sum of squared deviations per (batch, group), merged across pieces (Chan et al.)."""

    def __init__(self):
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor, groups: int) -> None:
        """Add a (B, C, ...) piece; its channels split into ``groups`` groups."""
        b = x.shape[0]
        var, mean = torch.var_mean(x.reshape(b, groups, -1).float(), dim=-1, unbiased=False)
        n = x[0, 0].numel() * (x.shape[1] // groups)
        mean, m2 = mean.double(), var.double() * n
        if self.mean is None:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.n * n / total)
        self.n = total

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean.float(), (self.m2 / self.n).float()


def whole_stats(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm mean and variance of a whole map, one group at a time (no full-size float copy)."""
    stats = [_Stats() for _ in range(groups)]
    per = x.shape[1] // groups
    for g, s in enumerate(stats):
        s.add(x[:, g * per : (g + 1) * per], 1)
    mean = torch.cat([s.mean_var()[0] for s in stats], dim=1)
    var = torch.cat([s.mean_var()[1] for s in stats], dim=1)
    return mean, var


def _normalise(norm: nn.GroupNorm, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """GroupNorm of ``x`` with the given per-(batch, group) statistics, then its affine transform."""
    per = x.shape[1] // norm.num_groups
    scale = torch.rsqrt(var + norm.eps).repeat_interleave(per, dim=1)  # (B, C)
    shift = -mean.repeat_interleave(per, dim=1) * scale
    if norm.affine:
        scale = scale * norm.weight
        shift = shift * norm.weight + norm.bias
    # float32 out, as GroupNorm under autocast gives
    return torch.addcmul(shift[:, :, None, None], x.float(), scale[:, :, None, None])


@contextlib.contextmanager
def _fixed_stats(norm: nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor) -> Iterator[None]:
    norm.forward = lambda x: _normalise(norm, x, mean, var)  # the instance attribute shadows the method
    try:
        yield
    finally:
        del norm.forward


# --- tiled layers ---------------------------------------------------------------------------------


def _tiled_resnet_block(block: ResnetBlock, x: torch.Tensor, size: int) -> torch.Tensor:
    layout = tiles(x.shape[2], x.shape[3], size, halo=2)  # two 3x3 convolutions
    mean1, var1 = whole_stats(x, block.norm1.num_groups)
    with _fixed_stats(block.norm1, mean1, var1):
        gathered = _Stats()
        for t in layout:  # pass 1: the second norm's statistics, from the first convolution's cores
            h = block.conv1(norm_swish(block.norm1, t.source(x)))
            gathered.add(t.core_of(h), block.norm2.num_groups)
            del h
        out = None
        with _fixed_stats(block.norm2, *gathered.mean_var()):
            for t in layout:  # pass 2: the block itself
                result = ResnetBlock.forward(block, t.source(x))
                if out is None:
                    out = x.new_empty((x.shape[0], result.shape[1], *x.shape[2:]), dtype=result.dtype)
                t.core_in(out).copy_(t.core_of(result))
    return out


def _tiled_upsample(layer: Upsample, x: torch.Tensor, size: int) -> torch.Tensor:
    out = None
    for t in tiles(x.shape[2], x.shape[3], size, halo=1):  # one 3x3 convolution at twice the size
        result = Upsample.forward(layer, t.source(x))
        if out is None:
            out = x.new_empty((x.shape[0], result.shape[1], 2 * x.shape[2], 2 * x.shape[3]), dtype=result.dtype)
        t.core_in(out, 2).copy_(t.core_of(result, 2))
    return out


def tile_side(channels: int, budget: int, element_size: int = 4, scale: int = 1) -> int:
    """Tile side (pixels) whose temporaries fit ``budget`` bytes."""
    return max(16, int(math.sqrt(budget / (LIVE_TENSORS * channels * element_size * scale * scale))))


@contextlib.contextmanager
def bounded_memory(model: nn.Module, budget: int) -> Iterator[None]:
    """Within, the residual blocks and upsampling layers of ``model`` whose activations would take
    more than ``budget`` bytes run tile by tile (with the untiled result)."""
    patched = []

    def block_forward(block: ResnetBlock, x: torch.Tensor) -> torch.Tensor:
        widest = max(block.in_channels, block.out_channels)
        if x.shape[2] * x.shape[3] * x.shape[0] * widest * 4 * LIVE_TENSORS <= budget:
            return ResnetBlock.forward(block, x)
        return _tiled_resnet_block(block, x, tile_side(widest * x.shape[0], budget // 4))

    def upsample_forward(layer: Upsample, x: torch.Tensor) -> torch.Tensor:
        if not layer.with_conv or x[0, 0].numel() * 4 * x.shape[0] * x.shape[1] * 4 * 2 <= budget:
            return Upsample.forward(layer, x)
        return _tiled_upsample(layer, x, tile_side(x.shape[1] * x.shape[0], budget // 4, scale=2))

    for module in model.modules():
        if isinstance(module, ResnetBlock):
            module.forward = lambda x, m=module: block_forward(m, x)
            patched.append(module)
        elif isinstance(module, Upsample):
            module.forward = lambda x, m=module: upsample_forward(m, x)
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def available_memory() -> int:
    """Bytes the kernel says can be allocated without swapping (MemAvailable), or 4 GiB if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


def default_budget() -> int:
    """A quarter of the memory available now for one layer's temporaries: the layer's input and
    output, the model and the images need the rest."""
    return available_memory() // 4


def parse_size(text: str) -> int:
    """'8GB', '512MiB', '2g', '1000000' to bytes."""
    units = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
             "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}
    s = text.strip().lower().replace(" ", "")
    number = s.rstrip("kmgtib")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not a memory size: {text!r} (e.g. 4GB, 512MB)") from None
    if unit not in units or value <= 0:
        raise ValueError(f"not a memory size: {text!r} (e.g. 4GB, 512MB)")
    return int(value * units[unit])


__all__ = ["bounded_memory", "default_budget", "parse_size", "tiles", "whole_stats"]
