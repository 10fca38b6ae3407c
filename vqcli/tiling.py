"""Encode and decode images of any size in bounded memory, with exactly the untiled result.

Where the memory goes: the encoder's first levels and the decoder's last ones work at the image's
resolution, where one feature map of a large image is gigabytes (128 channels at 4096x4096 in
float32: 8.6 GB), and an untiled residual block holds about seven of them at once (measured on the
CPU: its input, intermediate maps, and the convolutions' copies in their kernels' layout).

``bounded_memory`` runs those parts of the network in horizontal bands instead. The high-resolution
chain of each coder (the encoder's ``conv_in`` and down levels, the decoder's up levels and output
layers) is cut into *segments* between maps kept whole; a segment runs untiled if its work fits
the budget, else band by band, from its whole input to its whole output, and the maps inside it
never exist whole. The cuts are planned (dynamic programming over the layer boundaries) for the
least memory beyond the budget, then the least work. For a large image the decoder's last segment
ends at the 3-channel image: its full-resolution feature maps are never held at all.

Exactness (tests/test_tiling.py, tests/test_large_images.py):

- every band is computed with the rows around it that its convolutions need (a halo: one row per
  3x3 convolution on each side, scaled through the up- and downsamplings), and only rows that saw
  the map's real rows are kept, so every convolution sees exactly the pixels it sees untiled; zero
  padding counts only at the image's real borders;
- GroupNorm uses the statistics of the whole image, never of one band (per-band statistics cause
  seams and tone shifts between bands). A norm whose input is the segment's input takes them from
  that map; any later norm's input does not exist whole in memory. On the CPU, the segment then runs
  in *stages* cut before each such norm: each stage's whole output (the next norm's input) goes to
  an unnamed temporary file (``TMPDIR``, or /var/tmp where that is kept in memory), written and read
  in bands, never mapped, so it takes disk and page cache but not the process's memory; the norm's
  statistics are gathered as it is written (Chan et al.'s pairwise merge, in float64). Where there
  is no room on disk (or on a GPU, or where the files would cost more than they save), a pass over
  the bands computes the segment up to that norm, with the statistics already known, instead.

So the result equals the untiled network's up to float summation order (about 1e-6 in float32).
The price: stages write and read each inner map once (the SD decoder at 4096 px with a 4 GB budget
plans 1.4x the untiled work, the files counted at their measured speed, with up to 32 GB of them at
once); recomputing computes a segment's first layers up to K+1 times for K norms (the same plan:
7.5x), so without files the plan keeps segments short where the budget allows.

Attention blocks (the middle one at the latent resolution, and any at a level) mix every position
with every other: they run whole, on a whole map.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .accel import bounded_allocator
from .blocks import AttnBlock, Downsample, ResnetBlock, Upsample, full_precision, norm_swish
from .coders import _NO_FEATURES, Decoder, Encoder

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
    # float32 out, as GroupNorm under autocast gives
    return torch.addcmul(shift[:, :, None, None], x.float(), scale[:, :, None, None])


# --- bands of rows --------------------------------------------------------------------------------


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


# Steps: the layers of the network as operations on bands. Each gives its output map's shape
# (channels, height, width), the input rows it needs for given output rows, and runs on a band,
# giving every output row its input band determines exactly.


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
            out = F.conv2d(t, self.conv.weight, self.conv.bias, 1, p)
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


def _run_banded(steps: Sequence, inputs: list[torch.Tensor], budget: int, spill_dir: str | None = None) -> torch.Tensor:
    """``steps`` on the whole map ``inputs.pop()``, band by band, with whole-map GroupNorm
    statistics: in stages through temporary files in ``spill_dir`` where that costs less
    (``_staged_pays``; the input is freed after its last stage), else recomputing the segment up
    to each norm for its statistics."""
    x = inputs[-1]
    shapes = [tuple(x.shape[1:])]
    for step in steps:
        shapes.append(step.shape(*shapes[-1]))
    batch = x.shape[0]
    stats: dict = {}
    inner = _inner_norms(steps)
    for i, step in enumerate(steps):
        if isinstance(step, _Norm) and i not in inner:  # the norm of the segment's input
            stats[step] = whole_stats(x, step.norm.num_groups)
    if spill_dir is not None and _staged_pays(steps, shapes):
        del x
        return _run_staged(steps, shapes, inputs, budget, stats, spill_dir)
    inputs.pop()
    for i in inner:
        step = steps[i]
        gathered = _Stats()  # a pass over the bands of this norm's input, for its statistics
        for lo, hi in _bands(steps[:i], shapes[: i + 1], batch, budget):
            gathered.add(_forward(steps[:i], shapes[: i + 1], x, lo, hi, stats).t, step.norm.num_groups)
        stats[step] = gathered.mean_var()
    out = None
    for lo, hi in _bands(steps, shapes, batch, budget):
        band = _forward(steps, shapes, x, lo, hi, stats).t
        if out is None:
            out = _empty_map((batch, *shapes[-1]), band)
        out[:, :, lo:hi].copy_(band)
        del band
    return out


# --- banded segments in stages, through temporary files ----------------------------------------
#
# (See the module's docstring.) Files are written and read with pwrite/pread, never mapped: a
# mapped file's pages count in the process's resident memory, the page cache's do not, and the
# kernel writes them back to disk and drops them when memory is short.

# The cost of a byte kept in a file, in floating-point operations of convolution (measured on the
# development machine with 2 threads: fresh pages written at 0.3-0.9 GB/s and read back at 2-2.5 GB/s,
# convolutions at about 200 GFLOP/s).
WRITE_FLOPS_PER_BYTE = 400
READ_FLOPS_PER_BYTE = 100


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of the contiguous CPU tensor ``t``, without a copy (keep ``t`` while they are used)."""
    return memoryview((ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr())).cast("B")


class _Held:
    """A whole map in memory, read in bands."""

    def __init__(self, t: torch.Tensor):
        self.t = t

    def read(self, lo: int, hi: int) -> torch.Tensor:
        return self.t[:, :, lo:hi]

    def close(self) -> None:
        pass


class _Spilled:
    """A whole (B, C, H, W) map in an unnamed temporary file, stored row after row, written and read
    in bands."""

    def __init__(self, directory: str, shape: tuple[int, ...], memory_format: torch.memory_format):
        self.file = tempfile.TemporaryFile(dir=directory)
        self.directory = directory
        self.shape, self.memory_format = shape, memory_format
        self.dtype: torch.dtype | None = None  # the bands' (float32, or bfloat16 under autocast)

    def _row_bytes(self) -> int:
        b, c, _, w = self.shape
        return b * c * w * self.dtype.itemsize

    def write(self, band: _Band) -> None:
        if self.dtype is None:
            self.dtype = band.t.dtype
        rows = band.t.permute(2, 0, 1, 3).contiguous()  # (rows, B, C, W)
        data, offset = _bytes_of(rows), band.r0 * self._row_bytes()
        try:
            while data:
                n = os.pwrite(self.file.fileno(), data, offset)
                data, offset = data[n:], offset + n
        except OSError as e:  # a full disk, say: say which, and what to do
            raise OSError(e.errno, f"temporary file in {self.directory}: {e.strerror or e} (set TMPDIR to a "
                          "directory with more room, or give --max-memory more)") from None

    def read(self, lo: int, hi: int) -> torch.Tensor:
        b, c, _, w = self.shape
        rows = torch.empty((hi - lo, b, c, w), dtype=self.dtype)
        data, offset = _bytes_of(rows), lo * self._row_bytes()
        while data:
            n = os.preadv(self.file.fileno(), [data], offset)
            if n == 0:
                raise OSError(f"temporary file {self.file.name!r} ended early")
            data, offset = data[n:], offset + n
        return rows.permute(1, 2, 0, 3).contiguous(memory_format=self.memory_format)

    def close(self) -> None:
        self.file.close()


def _stages(steps: Sequence) -> tuple[list[int], dict[int, int], list[int]]:
    """How ``_run_staged`` cuts ``steps``: the stage boundaries (step indices: 0, one before each
    norm whose input is not the segment's, the end); for each residual addition whose block began in
    an earlier stage, the boundary whose map it adds (its block's input); and for each boundary,
    the last stage that reads its map."""
    bounds = [0, *_inner_norms(steps), len(steps)]

    def stage_of(i: int) -> int:
        return max(k for k, b in enumerate(bounds[:-1]) if b <= i)

    last_read = {b: k for k, b in enumerate(bounds[:-1])}
    residual_of, pushes = {}, []
    for j, step in enumerate(steps):
        if isinstance(step, _Push):
            pushes.append(j)
        elif isinstance(step, _Add):
            p = pushes.pop()
            if stage_of(p) == stage_of(j):
                continue
            lo, hi = p, p  # the maps between a _Push and the next step that changes it are all equal
            while lo > 0 and isinstance(steps[lo - 1], _Push):
                lo -= 1
            while hi < len(steps) and isinstance(steps[hi], _Push):
                hi += 1
            kept = [b for b in bounds if lo <= b <= hi]
            if not kept:
                raise AssertionError(f"step {j}: its block's input is not kept between stages")
            residual_of[j] = kept[0]
            last_read[kept[0]] = max(last_read[kept[0]], stage_of(j))
    return bounds, residual_of, [last_read.get(b, -1) for b in bounds]


def _staged_flops(steps: Sequence, shapes) -> float:
    """Work of ``_run_staged`` (per image): every step once, and the files' writing and reading."""
    bounds, residual_of, _ = _stages(steps)
    total = sum(_step_flops(step, shapes[j], shapes[j + 1]) for j, step in enumerate(steps))
    for b in bounds[1:-1]:
        c, h, w = shapes[b]
        reads = 1 + sum(1 for kept in residual_of.values() if kept == b)
        total += 4 * c * h * w * (WRITE_FLOPS_PER_BYTE + reads * READ_FLOPS_PER_BYTE)
    return total


def _staged_pays(steps: Sequence, shapes) -> bool:
    return len(_stages(steps)[0]) > 2 and _staged_flops(steps, shapes) < _recomputed_flops(steps, shapes)


def _staged_disk(steps: Sequence, shapes, batch: int) -> int:
    """The most bytes ``_run_staged`` keeps in files at once (float32)."""
    bounds, _, last_read = _stages(steps)
    most = 0
    for k in range(len(bounds) - 1):
        alive = [b for i, b in enumerate(bounds[1:-1], 1) if i <= k + 1 and last_read[i] >= k]
        most = max(most, sum(batch * 4 * shapes[b][0] * shapes[b][1] * shapes[b][2] for b in alive))
    return most


def _run_staged(steps: Sequence, shapes, inputs: list[torch.Tensor], budget: int, stats: dict, spill_dir: str) -> torch.Tensor:
    """``_run_banded`` in stages, each stage's output (the next norm's input) in a temporary file."""
    batch = inputs[-1].shape[0]
    memory_format = _memory_format(inputs[-1])
    bounds, residual_of, last_read = _stages(steps)
    maps = {0: _Held(inputs.pop())}  # (the only reference: freed after its last stage)
    out = None
    with contextlib.ExitStack() as files:
        for k in range(len(bounds) - 1):
            s, e = bounds[k], bounds[k + 1]
            part, sh = steps[s:e], shapes[s : e + 1]
            outer = [maps[residual_of[j]] for j in range(s, e) if j in residual_of]
            final = e == len(steps)
            if not final:
                target = _Spilled(spill_dir, (batch, *shapes[e]), memory_format)
                files.callback(target.close)
                gathered, groups = _Stats(), steps[e].norm.num_groups
            for lo, hi in _bands(part, sh, batch, budget):
                band = _forward(part, sh, maps[s], lo, hi, stats, outer)
                if final:
                    if out is None:
                        out = _empty_map((batch, *shapes[-1]), band.t)
                    out[:, :, lo:hi].copy_(band.t)
                else:
                    gathered.add(band.t, groups)
                    target.write(band)
                del band
            if not final:
                stats[steps[e]] = gathered.mean_var()
                maps[e] = target
            for i, b in enumerate(bounds[:-1]):
                if b in maps and last_read[i] <= k:
                    maps.pop(b).close()  # no later stage reads it
    return out


def spill_directory() -> str | None:
    """Where banded work keeps its temporary files: the temporary directory (``TMPDIR``), or
    /var/tmp where that is kept in memory (tmpfs); None where neither will do (or no pwrite)."""
    if not hasattr(os, "pwrite"):
        return None
    for directory in (tempfile.gettempdir(), "/var/tmp"):
        if os.path.isdir(directory) and os.access(directory, os.W_OK) and not _in_memory(directory):
            return directory
    return None


def _in_memory(path: str, mountinfo: str | None = None) -> bool:
    """Whether ``path`` is on a file system kept in memory (tmpfs, ramfs): the type of the mount
    holding it, from ``mountinfo`` (the text of /proc/self/mountinfo; where there is none, the path
    is taken to be on a disk)."""
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo") as f:
                mountinfo = f.read()
        except OSError:
            return False
    real = os.path.realpath(path)
    best, fstype = "", ""
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields[5:] or len(fields) < 5:
            continue
        mount = fields[4].replace("\\040", " ")
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, fstype = mount, fields[fields.index("-", 5) + 1]
    return fstype in ("tmpfs", "ramfs")


# --- the coders as chains of units ----------------------------------------------------------------


@dataclass
class _Unit:
    """One layer of a coder: its steps, its own untiled forward, and whether it must run whole."""

    steps: list
    whole: Callable[[torch.Tensor], torch.Tensor]
    barrier: bool = False  # attention: whole input, whole output
    price: tuple[float, float, float] = OTHER_WHOLE  # what it holds running untiled (see BLOCK_WHOLE)

    def shape(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        for step in self.steps:
            shape = step.shape(*shape)
        return shape


def _block_unit(block: ResnetBlock) -> _Unit:
    steps = [_Push(), _Norm(block.norm1), _Conv(block.conv1), _Norm(block.norm2), _Conv(block.conv2), _Add(block)]
    return _Unit(steps, lambda x: ResnetBlock.forward(block, x), price=BLOCK_WHOLE)


def _upsample_unit(layer: Upsample) -> _Unit:
    steps = [_Up(), _Conv(layer.conv)] if layer.with_conv else [_Up()]
    return _Unit(steps, lambda x: Upsample.forward(layer, x))


def _attn_unit(attn: AttnBlock) -> _Unit:
    return _Unit([], attn, barrier=True)


def _decoder_units(decoder: Decoder) -> list[_Unit]:
    """``Decoder.run_high_res`` as units."""
    units = []
    for i_level in reversed(range(decoder.num_resolutions)):
        up = decoder.up[i_level]
        for i_block, block in enumerate(up.block):
            units.append(_block_unit(block))
            if len(up.attn) > 0:
                units.append(_attn_unit(up.attn[i_block]))
        if i_level != 0:
            units.append(_upsample_unit(up.upsample))
    if not decoder.give_pre_end:
        units.append(
            _Unit(
                [_Norm(decoder.norm_out), _Conv(decoder.conv_out, full_precision=True)],
                lambda h: full_precision(decoder.conv_out, norm_swish(decoder.norm_out, h)),
            )
        )
    return units


def _encoder_units(encoder: Encoder) -> list[_Unit]:
    """``Encoder.run_high_res`` as units."""
    units = [_Unit([_Conv(encoder.conv_in)], encoder.conv_in)]
    for i_level, down in enumerate(encoder.down):
        for i_block, block in enumerate(down.block):
            units.append(_block_unit(block))
            if len(down.attn) > 0:
                units.append(_attn_unit(down.attn[i_block]))
        if i_level != encoder.num_resolutions - 1:
            units.append(_Unit([_Down(down.downsample)], lambda x, d=down.downsample: Downsample.forward(d, x)))
    return units


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


def _banded_flops(steps: Sequence, shapes, spill: bool = False) -> float:
    """Work of ``_run_banded``: the cheaper of stages through files (where ``spill``) and recomputing."""
    work = _recomputed_flops(steps, shapes)
    return min(work, _staged_flops(steps, shapes)) if spill and len(_stages(steps)[0]) > 2 else work


def _whole_bytes(unit: _Unit, size_in: int, size_out: int) -> int:
    """The memory ``unit`` holds running untiled on an input of ``size_in`` bytes (its input
    included) that gives ``size_out`` bytes."""
    a, b, c = unit.price
    return int(a * size_in + b * size_out + c * max(size_in, size_out))


def _plan(units: list[_Unit], shapes, batch: int, budget: int, spill: bool = False) -> list[tuple[int, int, bool]]:
    """Segments ``(start, end, banded)`` covering ``units``: the least memory beyond ``budget``
    first, then the least work (dynamic programming over the boundaries kept whole). ``spill``:
    banded segments may run in stages through temporary files."""
    n = len(units)

    def nbytes(i: int) -> int:
        c, h, w = shapes[i]
        return batch * c * h * w * 4

    unit_shapes = []  # shapes at each step of each unit
    for i, unit in enumerate(units):
        sh = [shapes[i]]
        for step in unit.steps:
            sh.append(step.shape(*sh[-1]))
        unit_shapes.append(sh)
    best: list = [None] * (n + 1)
    best[0] = (0, 0.0, None)  # (memory beyond the budget, work per image, (start, banded))
    for end in range(1, n + 1):
        for start in range(end - 1, -1, -1):
            segment = units[start:end]
            if len(segment) > 1 and segment[0].barrier:
                break  # attention runs whole, alone
            if len(segment) > 1 and segment[-1].barrier:
                break
            options = []
            if len(segment) == 1:
                unit = segment[0]
                whole = 0 if unit.barrier else _whole_bytes(unit, nbytes(start), nbytes(end))
                sh = unit_shapes[start]
                work = sum(_step_flops(st, sh[j], sh[j + 1]) for j, st in enumerate(unit.steps))
                options.append((max(0, whole - budget), work, False))
            if not segment[0].barrier:
                steps = [st for u in segment for st in u.steps]
                sh = [shapes[start]] + [x for k in range(start, end) for x in unit_shapes[k][1:]]
                held = nbytes(start) + nbytes(end)
                options.append((max(0, held - budget * 3 // 4), _banded_flops(steps, sh, spill), True))
            before_excess, before_work, _ = best[start]
            for excess, work, banded in options:
                candidate = (max(before_excess, excess), before_work + work, (start, banded))
                if best[end] is None or candidate[:2] < best[end][:2]:
                    best[end] = candidate
    plan, end = [], n
    while end > 0:
        start, banded = best[end][2]
        plan.append((start, end, banded))
        end = start
    return plan[::-1]


def _run_units(
    units: list[_Unit], inputs: list[torch.Tensor], budget: int, compile_for: nn.Module | None = None
) -> torch.Tensor:
    """Run ``units`` on ``inputs.pop()`` within about ``budget`` bytes of working memory: each
    segment of the plan untiled if its work fits, else band by band between its input and output,
    kept whole. (The input comes in a list so that no caller's reference keeps it alive.)

    With ``compile_for`` (the coder the units belong to), an input that fits whole runs through
    the coder's torch.compile'd units (see ``_compiled``)."""
    x = inputs.pop()
    batch = x.shape[0]
    budget = int(budget * HEADROOM)
    shapes = [tuple(x.shape[1:])]
    for unit in units:
        shapes.append(unit.shape(shapes[-1]))
    cpu = x.device.type == "cpu"
    directory = spill_directory() if cpu else None  # (on a GPU, recomputing is cheap)
    plan = _plan(units, shapes, batch, budget, spill=directory is not None)
    if directory is not None:
        disk = _plan_disk(units, plan, shapes, batch)
        free = _free_disk(directory)
        if disk > 0.9 * free:
            log.warning(
                "%d MB free in %s for %d MB of temporary files: recomputing instead (slower; set TMPDIR "
                "to a directory with more room)", free >> 20, directory, disk >> 20,
            )
            directory = None
            plan = _plan(units, shapes, batch, budget)
    large = any(banded for _, _, banded in plan)
    if not large and compile_for is not None:
        y = _run_compiled(compile_for, units, x)
        if y is not None:
            return y
    inputs.append(x)
    del x  # (only the list holds the input, so that the first segment done frees it)
    with bounded_allocator() if large and cpu else contextlib.nullcontext():
        return _run_plan(units, plan, shapes, inputs, budget, directory)


def _segment(units: list[_Unit], shapes, start: int, end: int) -> tuple[list, list[tuple[int, int, int]]]:
    """The steps of ``units[start:end]`` and the shapes of their maps (from ``shapes[start]``)."""
    steps = [step for u in units[start:end] for step in u.steps]
    sh = [shapes[start]]
    for step in steps:
        sh.append(step.shape(*sh[-1]))
    return steps, sh


def _plan_disk(units: list[_Unit], plan, shapes, batch: int) -> int:
    """The most bytes of temporary files that ``plan`` keeps at once."""
    most = 0
    for start, end, banded in plan:
        steps, sh = _segment(units, shapes, start, end)
        if banded and _staged_pays(steps, sh):
            most = max(most, _staged_disk(steps, sh, batch))
    return most


def _free_disk(directory: str) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _run_plan(
    units: list[_Unit], plan, shapes, inputs: list[torch.Tensor], budget: int, spill_dir: str | None = None
) -> torch.Tensor:
    """The segments of ``plan`` in turn on ``inputs.pop()`` (banded ones staged through temporary
    files in ``spill_dir`` where that pays)."""
    x = inputs.pop()
    batch = x.shape[0]
    for start, end, banded in plan:
        if not banded:
            x = units[start].whole(x)
            continue
        c0, h0, w0 = shapes[start]
        c1, h1, w1 = shapes[end]
        held = batch * 4 * (c0 * h0 * w0 + c1 * h1 * w1)
        log.debug("units %d-%d in bands (%d MB held whole)", start, end - 1, held >> 20)
        steps = [step for u in units[start:end] for step in u.steps]
        inputs.append(x)
        del x  # (so that a staged run can free it after its last stage)
        x = _run_banded(steps, inputs, max(budget - held, budget // 4), spill_dir)
    return x


# --- torch.compile --------------------------------------------------------------------------------


def _compiled(coder: nn.Module, units: list[_Unit]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The coder's units run whole, one after another, as one torch.compile'd function: made at the
    first call and kept on the coder (None once compiling has failed). The units call the blocks'
    own forward functions, not the bounded ones that ``bounded_memory`` puts on the instances."""
    if not hasattr(coder, "_vqcli_compiled"):
        def run(x: torch.Tensor) -> torch.Tensor:
            for unit in units:
                x = unit.whole(x)
            return x

        coder._vqcli_compiled = torch.compile(run)
    return coder._vqcli_compiled


def _run_compiled(coder: nn.Module, units: list[_Unit], x: torch.Tensor) -> torch.Tensor | None:
    """``units`` on ``x`` through the compiled function; None where there is none, or where
    torch.compile fails (no C++ compiler, say): said once, and the coder runs as written."""
    fn = _compiled(coder, units)
    if fn is None:
        return None
    from torch._inductor import config

    try:
        # freezing: the weights become constants of the graph (so a model whose weights change
        # after its first compiled call would keep the old ones), the convolutions prepacked for
        # oneDNN: without it, compiled float32 ran at 0.80x of eager on this CPU, with it 0.8x-1.05x
        # (README, Speed). Compiling happens at the first call of each shape: the setting goes here.
        with config.patch(freezing=True):
            return fn(x)
    except Exception as e:  # torch.compile's failures come in many types, from many layers
        from torch._dynamo.exc import TorchDynamoException

        if not isinstance(e, TorchDynamoException):
            raise
        text = str(e).strip().splitlines()
        log.warning("--compile: torch.compile failed (%s); running without it", text[0][:200] if text else type(e).__name__)
        coder._vqcli_compiled = None
        return None


def _plain(module: nn.Module) -> bool:
    """Whether ``module`` should run as written: gradients wanted, or training (dropout)."""
    return torch.is_grad_enabled() or module.training


@contextlib.contextmanager
def bounded_memory(model: nn.Module, budget: int, *, compile: bool = False) -> Iterator[None]:
    """Within, ``model``'s encoders and decoders (and its residual blocks and upsampling layers
    called on their own) keep their working memory within about ``budget`` bytes, computing in bands
    what does not fit, with the untiled result. Without gradients only: training runs as written.

    ``compile``: the coders' high-resolution parts, where they fit whole, run torch.compile'd (the
    first call of each input shape compiles; large images in bands run as written)."""
    patched: list[tuple[nn.Module, str]] = []

    def patch(module: nn.Module, name: str, fn: Callable) -> None:
        setattr(module, name, fn)  # the instance attribute shadows the method
        patched.append((module, name))

    for module in model.modules():
        if isinstance(module, (Encoder, Decoder)):
            make_units = _encoder_units if isinstance(module, Encoder) else _decoder_units

            def run_high_res(h, keep=_NO_FEATURES, m=module, make_units=make_units):
                if keep is not _NO_FEATURES or _plain(m):  # features wanted: every map, whole
                    return type(m).run_high_res(m, h, keep)
                held = [h]
                del h  # (so that the input map is freed as soon as the first segment is done)
                return _run_units(make_units(m), held, budget, m if compile else None)

            patch(module, "run_high_res", run_high_res)
        elif isinstance(module, (ResnetBlock, Upsample)):
            unit_of = _block_unit if isinstance(module, ResnetBlock) else _upsample_unit

            def forward(x, m=module, unit_of=unit_of):
                if _plain(m):
                    return type(m).forward(m, x)
                return _run_units([unit_of(m)], [x], budget)

            patch(module, "forward", forward)
    try:
        yield
    finally:
        for module, name in patched:
            delattr(module, name)


# --- the budget -----------------------------------------------------------------------------------


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
    """A quarter of the memory available now: the model, the images, the batches waiting and other
    programs need the rest. (A run takes it once, at its start: the heap it keeps between images
    would otherwise shrink it image by image.)"""
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


__all__ = ["available_memory", "bounded_memory", "default_budget", "parse_size", "whole_stats"]
