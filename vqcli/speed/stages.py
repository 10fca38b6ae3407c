"""Banded segments in stages, through temporary files, when even bands of every layer would not fit."""

from __future__ import annotations

import contextlib
import ctypes
import os
import tempfile
from collections.abc import Sequence

import torch

from vqcli.speed.bands import (
    _Add,
    _Band,
    _bands,
    _empty_map,
    _forward,
    _Held,
    _inner_norms,
    _memory_format,
    _Norm,
    _Push,
    _recomputed_flops,
    _Stats,
    _step_flops,
    whole_stats,
)

# The cost of a byte kept in a file, in floating-point operations of convolution (measured on the
# development machine with 2 threads: fresh pages written at 0.3-0.9 GB/s and read back at 2-2.5 GB/s,
# convolutions at about 200 GFLOP/s).
WRITE_FLOPS_PER_BYTE = 400
READ_FLOPS_PER_BYTE = 100


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of the contiguous CPU tensor ``t``, without a copy (keep ``t`` while they are used)."""
    return memoryview((ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr())).cast("B")


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
