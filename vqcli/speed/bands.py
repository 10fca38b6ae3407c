"""Layers run in bands of rows with whole-image GroupNorm statistics: exactly the untiled result in bounded memory."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vqcli.model.blocks import Downsample, ResnetBlock, in_dtype_of

log = logging.getLogger(__name__)


# What a unit holds when it runs untiled, in maps of its input's size (``IN``), its output's
# (``OUT``) and the larger of the two (``MAX``). Measured on the CPU in float32, as the peak RSS
# beyond the input (SD decoder and encoder, 512 px, batch 4), in maps of the larger side: a
# residual block 4.0 with as many channels out as in or twice as many, 2.5 when it halves them; the
# upsampling (four phase convolutions, never the nearest-upsampled copy) 2.3; the downsampling 2.3;
# conv_in 2.0. The prices below, the input included, are at or above those.
BLOCK_WHOLE = (1.0, 2.0, 2.0)  # (IN, OUT, MAX): the input, its normalised copy, the outputs
OTHER_WHOLE = (1.0, 0.0, 2.5)


# The share of the budget planned for: the allocator's fragmentation and the kernels' scratch space
# take the rest (measured: a 4096 px decode peaks within the budget plus the runtime's own memory).
HEADROOM = 0.85
MIN_BAND_ROWS = 8  # below this the halos would cost more than the bands


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
    """GroupNorm mean and variance of a whole map, a few rows at a time (no full-size float copy)."""
    stats = _Stats()
    row_bytes = x.shape[0] * x.shape[1] * x.shape[3] * 4
    rows = max(1, (32 * 2**20) // max(1, row_bytes))
    for r in range(0, x.shape[2], rows):
        stats.add(x[:, :, r : r + rows], groups)
    return stats.mean_var()


def _normalise(norm: nn.GroupNorm, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """GroupNorm of ``x`` with the given per-(batch, group) statistics, then its affine transform."""
    per = x.shape[1] // norm.num_groups
    scale = torch.rsqrt(var + norm.eps).repeat_interleave(per, dim=1)  # (B, C)
    shift = -mean.repeat_interleave(per, dim=1) * scale
    if norm.affine:
        scale = scale * norm.weight
        shift = shift * norm.weight + norm.bias
    out = torch.addcmul(shift[:, :, None, None], x.float(), scale[:, :, None, None])
    # float32 out under autocast, as GroupNorm there gives; else the input's dtype, as GroupNorm
    # with weights cast to it gives (``Normalize``)
    return out if torch.is_autocast_enabled(x.device.type) else out.to(x.dtype)


@dataclass
class _Band:
    """Rows ``[r0, r0 + rows)`` of a map ``height`` rows high (all its columns and channels)."""

    t: torch.Tensor
    r0: int
    height: int

    @property
    def r1(self) -> int:
        return self.r0 + self.t.shape[2]

    def rows(self, lo: int, hi: int) -> _Band:
        if not self.r0 <= lo <= hi <= self.r1:
            raise AssertionError(f"band has rows [{self.r0}, {self.r1}), [{lo}, {hi}) asked")
        return _Band(self.t[:, :, lo - self.r0 : hi - self.r0], lo, self.height)


class _Conv:
    """A stride-1 convolution with zero "same" padding (3x3, padding 1; or 1x1)."""

    def __init__(self, conv: nn.Conv2d, *, full_precision: bool = False):
        k, p = conv.kernel_size[0], conv.padding[0]
        if conv.kernel_size != (k, k) or conv.padding != (p, p) or k != 2 * p + 1 or conv.stride != (1, 1):
            raise ValueError(f"not a stride-1 'same' convolution: {conv}")
        if conv.dilation != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(f"not a plain convolution: {conv}")
        self.conv, self.pad = conv, p
        self.full_precision = full_precision  # an output layer: float32 under autocast too

    def shape(self, c: int, h: int, w: int) -> tuple[int, int, int]:
        return self.conv.out_channels, h, w

    def need(self, lo: int, hi: int, h: int) -> tuple[int, int]:
        return max(0, lo - self.pad), min(h, hi + self.pad)

    def run(self, b: _Band, stats) -> _Band:
        # Zero padding on every side, as untiled (no padded copy of the band); then the rows next to
        # an inner edge of the band, which saw zeros in place of the map's rows, are dropped.
        p, t = self.pad, b.t
        if self.full_precision and torch.is_autocast_enabled(t.device.type):
            with torch.autocast(device_type=t.device.type, enabled=False):
                out = F.conv2d(t.float(), self.conv.weight, self.conv.bias, 1, p)
        else:
            out = F.conv2d(in_dtype_of(self.conv, t), self.conv.weight, self.conv.bias, 1, p)
        top = p if b.r0 > 0 else 0
        bottom = p if b.r1 < b.height else 0
        return _Band(out[:, :, top : out.shape[2] - bottom], b.r0 + top, b.height)


class _Norm:
    """GroupNorm with the statistics of the whole map, then swish."""

    def __init__(self, norm: nn.GroupNorm):
        self.norm = norm

    def shape(self, c: int, h: int, w: int) -> tuple[int, int, int]:
        return c, h, w

    def need(self, lo: int, hi: int, h: int) -> tuple[int, int]:
        return lo, hi

    def run(self, b: _Band, stats) -> _Band:
        return _Band(F.silu(_normalise(self.norm, b.t, *stats[self]), inplace=True), b.r0, b.height)


class _Up:
    """Nearest-neighbour upsampling by 2."""

    def shape(self, c: int, h: int, w: int) -> tuple[int, int, int]:
        return c, 2 * h, 2 * w

    def need(self, lo: int, hi: int, h: int) -> tuple[int, int]:
        return lo // 2, min(h, (hi + 1) // 2)

    def run(self, b: _Band, stats) -> _Band:
        return _Band(F.interpolate(b.t, scale_factor=2.0, mode="nearest"), 2 * b.r0, 2 * b.height)


class _Down:
    """``Downsample``: zero row and column at the bottom and right, then a stride-2 3x3 convolution;
    or 2x2 average pooling."""

    def __init__(self, layer: Downsample):
        self.layer = layer

    def shape(self, c: int, h: int, w: int) -> tuple[int, int, int]:
        if self.layer.with_conv:
            return c, (h - 2) // 2 + 1, (w - 2) // 2 + 1
        return c, h // 2, w // 2

    def need(self, lo: int, hi: int, h: int) -> tuple[int, int]:
        return 2 * lo, min(h, 2 * hi + (1 if self.layer.with_conv else 0))

    def run(self, b: _Band, stats) -> _Band:
        t, r0 = b.t, b.r0
        if r0 % 2:  # output rows start at even input rows
            t, r0 = t[:, :, 1:], r0 + 1
        out_h = self.shape(1, b.height, 1)[1]
        if self.layer.with_conv:
            t = F.pad(t, (0, 1, 0, 1 if b.r1 == b.height else 0))
            conv = self.layer.conv
            return _Band(F.conv2d(t, conv.weight, conv.bias, 2, 0), r0 // 2, out_h)
        return _Band(F.avg_pool2d(t, kernel_size=2, stride=2), r0 // 2, out_h)


class _Push:
    """Keep the band for a residual connection."""

    def shape(self, c: int, h: int, w: int) -> tuple[int, int, int]:
        return c, h, w


class _Add:
    """Add the kept band (through the block's 1x1 shortcut convolution, if any), as ``ResnetBlock``."""

    def __init__(self, block: ResnetBlock):
        self.shortcut = block.nin_shortcut if block.in_channels != block.out_channels else None

    def shape(self, c: int, h: int, w: int) -> tuple[int, int, int]:
        return c, h, w

    def run(self, b: _Band, kept: _Band) -> _Band:
        x = kept.rows(b.r0, b.r1).t
        if self.shortcut is not None:
            x = self.shortcut(x)
        return _Band(x + b.t, b.r0, b.height)


def _needs(steps: Sequence, shapes: Sequence[tuple[int, int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """For output rows [lo, hi) of ``steps``: the rows each step's input must have."""
    needs: list[tuple[int, int]] = [(lo, hi)] * (len(steps) + 1)
    kept = []  # rows the residual additions need of their kept bands
    for j in reversed(range(len(steps))):
        step = steps[j]
        if isinstance(step, _Add):
            kept.append((lo, hi))
        elif isinstance(step, _Push):
            if kept:  # (a prefix of the steps may end inside a block, before its addition)
                klo, khi = kept.pop()
                lo, hi = min(lo, klo), max(hi, khi)
        else:
            lo, hi = step.need(lo, hi, shapes[j][1])
        needs[j] = (lo, hi)
    return needs


def _inner_norms(steps: Sequence) -> list[int]:
    """Indices of the norms whose input is not the segment's input (a step other than ``_Push``
    comes before them): their statistics need a pass over the bands, or a stage of their own."""
    return [i for i, s in enumerate(steps) if isinstance(s, _Norm) and not all(isinstance(p, _Push) for p in steps[:i])]


def _forward(steps: Sequence, shapes, x, lo: int, hi: int, stats, outer: Sequence = ()) -> _Band:
    """Rows [lo, hi) of the output of ``steps`` on the whole map ``x`` (a tensor, or a map kept in
    a file: ``_Spilled``), computed from its rows around them. ``outer``: where the residual
    additions whose blocks began before ``steps`` find their kept maps, in order."""
    source = _Held(x) if isinstance(x, torch.Tensor) else x
    outer = list(outer)
    needs = _needs(steps, shapes, lo, hi)
    band = _Band(source.read(*needs[0]), needs[0][0], shapes[0][1])
    kept = []
    for j, step in enumerate(steps):
        if isinstance(step, _Push):
            kept.append(band)
        elif isinstance(step, _Add):
            if kept:
                residual = kept.pop()
            else:  # the block began in an earlier stage (``_run_staged``)
                residual = _Band(outer.pop(0).read(band.r0, band.r1), band.r0, band.height)
            band = step.run(band, residual)
        else:
            band = step.run(band, stats)
        band = band.rows(*needs[j + 1])  # drop what no later step needs
    return band


def _band_bytes(steps: Sequence, shapes, batch: int, lo: int, hi: int) -> int:
    """The most memory a band's computation holds at once: the band kept for a residual connection,
    each step's input and output, and for a convolution also its zero-padded input and the copies
    in the kernel's blocked layout."""
    needs = _needs(steps, shapes, lo, hi)

    def nbytes(j: int) -> int:
        c, _, w = shapes[j]
        return batch * c * w * (needs[j][1] - needs[j][0]) * 4

    most = kept = 0
    for j, step in enumerate(steps):
        if isinstance(step, _Push):
            kept = nbytes(j)
        conv = isinstance(step, (_Conv, _Down))
        outer = nbytes(j) if isinstance(step, _Add) and not kept else 0  # read from an earlier stage
        most = max(most, kept + outer + (3 if conv else 1) * nbytes(j) + (2 if conv else 1) * nbytes(j + 1))
        if isinstance(step, _Add):
            kept = 0
    return most


def _bands(steps: Sequence, shapes, batch: int, budget: int) -> list[tuple[int, int]]:
    """Row ranges covering the output of ``steps``, each band's work within ``budget`` where it can be."""
    height = shapes[-1][1]

    def fits(rows: int) -> bool:
        lo = max(0, (height - rows) // 2)  # a band in the middle: halos on both sides
        return _band_bytes(steps, shapes, batch, lo, lo + rows) <= budget

    small, large = 0, height  # largest band that fits, by bisection
    while small < large:
        mid = (small + large + 1) // 2
        if fits(mid):
            small = mid
        else:
            large = mid - 1
    rows = max(small, min(height, MIN_BAND_ROWS))
    count = -(-height // rows)
    rows = -(-height // count)  # even the bands out
    return [(r, min(r + rows, height)) for r in range(0, height, rows)]


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _empty_map(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised whole map for the bands' results, in ``like``'s dtype, device and layout.
    (On the CPU, banded work runs under ``accel.bounded_allocator``: a large map gets pages of its
    own, returned to the system as soon as it is freed.)"""
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=_memory_format(like))


def _step_flops(step, shape_in: tuple[int, int, int], shape_out: tuple[int, int, int]) -> float:
    """Rough work of one step on one image (convolutions' multiply-adds; elementwise work)."""
    c_out, h, w = shape_out
    if isinstance(step, (_Conv, _Down)):
        conv = step.conv if isinstance(step, _Conv) else step.layer.conv if step.layer.with_conv else None
        if conv is not None:
            return 2.0 * c_out * h * w * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    if isinstance(step, _Add) and step.shortcut is not None:
        return 2.0 * c_out * h * w * step.shortcut.in_channels
    return 8.0 * c_out * h * w


def _recomputed_flops(steps: Sequence, shapes) -> float:
    """Work of ``_run_banded`` without files (per image): one pass up to each norm whose input is not
    the segment's, and one pass through all."""
    flops = [_step_flops(step, shapes[j], shapes[j + 1]) for j, step in enumerate(steps)]
    return sum(flops) + sum(sum(flops[:i]) for i in _inner_norms(steps))


class _Held:
    """A whole map in memory, read in bands."""

    def __init__(self, t: torch.Tensor):
        self.t = t

    def read(self, lo: int, hi: int) -> torch.Tensor:
        return self.t[:, :, lo:hi]

    def close(self) -> None:
        pass
