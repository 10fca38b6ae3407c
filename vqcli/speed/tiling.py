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
with every other: they take a whole map and give a whole map, computed in bands of queries where
the budget or the length of one product asks for it (``vqcli.speed.attention``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vqcli.model.blocks import (
    AttnBlock,
    Downsample,
    ResnetBlock,
    Upsample,
    full_precision,
    in_dtype_of,
    norm_swish,
)
from vqcli.model.coders import _NO_FEATURES, Decoder, Encoder
from vqcli.speed.attention import bounded_attention
from vqcli.speed.bands import (
    BLOCK_WHOLE,
    HEADROOM,
    OTHER_WHOLE,
    _Add,
    _Conv,
    _Down,
    _Norm,
    _Push,
    _recomputed_flops,
    _step_flops,
    _Up,
)
from vqcli.speed.heap import bounded_allocator
from vqcli.speed.stages import (
    _run_banded,
    _staged_disk,
    _staged_flops,
    _staged_pays,
    _stages,
    spill_directory,
)

log = logging.getLogger(__name__)


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
    return _Unit(steps, lambda x: type(layer).forward(layer, x))  # (priced for the fast form a run swaps in)


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
    conv_in = encoder.conv_in
    units = [_Unit([_Conv(conv_in)], lambda x: conv_in(in_dtype_of(conv_in, x)))]
    for i_level, down in enumerate(encoder.down):
        for i_block, block in enumerate(down.block):
            units.append(_block_unit(block))
            if len(down.attn) > 0:
                units.append(_attn_unit(down.attn[i_block]))
        if i_level != encoder.num_resolutions - 1:
            units.append(_Unit([_Down(down.downsample)], lambda x, d=down.downsample: Downsample.forward(d, x)))
    return units


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


def forget_compiled(model: nn.Module) -> nn.Module:
    """``model``, a copy of a model, without the compiled functions ``_compiled`` kept on the
    original's coders (copied by reference, they would run the original's layers)."""
    for module in model.modules():
        module.__dict__.pop("_vqcli_compiled", None)
    return model


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
    """Within, ``model``'s encoders and decoders (and its residual blocks, upsampling layers and
    attention blocks called on their own) keep their working memory within about ``budget`` bytes, computing in bands
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
        elif isinstance(module, AttnBlock):

            def attend(x, m=module):
                if _plain(m):
                    return type(m).forward(m, x)
                return bounded_attention(m, x, int(budget * HEADROOM))

            patch(module, "forward", attend)
    try:
        yield
    finally:
        for module, name in patched:
            delattr(module, name)


__all__ = ["bounded_memory", "forget_compiled"]
