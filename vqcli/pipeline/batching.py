"""Batches through the model: grouping, compute with the float32 redo, writing results."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from vqcli.errors import FileError, first_line
from vqcli.io.atomic import is_out_of_space, sweep_stale
from vqcli.model.autoencoder import AutoEncoder
from vqcli.pipeline.overlap import WriteBehind, ordered_map
from vqcli.pipeline.results import (
    DONE,
    FAILED,
    SKIPPED,
    FileResult,
    Job,
    StopRun,
    _from_error,
)
from vqcli.pipeline.sources import check_existing
from vqcli.speed.budget import default_budget
from vqcli.speed.context import compute_context, compute_model, memory_format_for
from vqcli.speed.heap import release_heap_above
from vqcli.speed.oom import retry_in_tiles

log = logging.getLogger(__name__)


@dataclass
class Item:
    """One file on its way through the model."""

    job: Job
    data: torch.Tensor  # (1, ...) model input: padded image, latent or indices
    key: tuple  # items with equal keys can share a batch
    model: AutoEncoder
    info: dict[str, Any] = field(default_factory=dict)


def batched(
    stream: Iterable[Item | FileResult], batch_size: int, *, max_pending: int | None = None
) -> Iterator[list[Item] | FileResult]:
    """Group items of equal ``key`` into lists of at most ``batch_size``; results pass through.

    At most ``max_pending`` items (default 4 batches) are held back waiting for partners; past that
    the oldest group goes out as it is. Items of different blocks (``Job.block``) never share a
    batch: what waits goes out when the next block starts, so a block's batches are the same
    whatever came before it (see ``number_blocks``).
    """
    if batch_size <= 1:
        for item in stream:
            yield item if isinstance(item, FileResult) else [item]
        return
    limit = max_pending or 4 * batch_size
    pending: dict[tuple, list[Item]] = {}
    held = 0
    block = None
    for item in stream:
        if isinstance(item, FileResult):
            yield item
            continue
        if item.job.block != block:
            yield from pending.values()
            pending, held, block = {}, 0, item.job.block
        group = pending.setdefault(item.key, [])
        group.append(item)
        held += 1
        if len(group) >= batch_size:
            held -= len(group)
            yield pending.pop(item.key)
        elif held > limit:
            oldest = next(iter(pending))
            held -= len(pending[oldest])
            yield pending.pop(oldest)
    yield from pending.values()


NON_FINITE = "NaN or infinite values"


def finite(y: torch.Tensor) -> bool:
    """Whether a model output is all numbers: floats finite, and codebook indices not negative
    (-1 marks a position whose code could not be chosen: a NaN or infinite encoder output, see
    ``vq_indices``)."""
    if y.is_floating_point():
        return bool(torch.isfinite(y).all())
    return not y.numel() or int(y.min()) >= 0


def vq_indices(model: AutoEncoder, x: torch.Tensor) -> torch.Tensor:
    """``model.encode_indices(x)``, with -1 where the encoder's output is not finite (the nearest
    code to NaN would be index 0, silently)."""
    h = model.encode_moments(x)
    indices = model.quantize(h).indices
    bad = ~torch.isfinite(h).all(dim=1)
    return indices.masked_fill(bad, -1) if bool(bad.any()) else indices


def checked(y: torch.Tensor, what: str) -> torch.Tensor:
    """``y``, or a ``ValueError`` naming ``what`` made it when it is not finite (see ``finite``)."""
    if not finite(y):
        raise ValueError(f"the {what}'s output has {NON_FINITE}")
    return y


def compute(
    batch: list[Item],
    fn: Callable[[AutoEncoder, torch.Tensor], torch.Tensor],
    dtype: torch.dtype,
    budget: int | None = None,
    compile: bool = False,
) -> list[tuple[Item, torch.Tensor | FileError, bool]]:
    """Run ``fn(model, inputs)`` over a batch: ``(item, output or error, redone in float32)`` each.

    A batch that runs out of memory is computed again in tiles under smaller budgets, with the same
    result (``speed.oom``); one that still fails as a whole is retried one item at a time, so that
    only the items that fail on their own are reported. A floating output with NaN or Inf values
    is redone in float32 when ``dtype`` is reduced precision, and an error otherwise. ``budget``
    bounds the memory of one layer's work (see ``vqcli.speed.tiling``; None: from the device's
    free memory); ``compile`` runs what fits whole torch.compile'd.
    """
    model = batch[0].model
    device = next(model.parameters()).device
    budget = budget or default_budget(device)
    failure = None
    try:
        out = _run(model, fn, torch.cat([item.data for item in batch]), device, dtype, budget, compile)
    except RuntimeError as e:
        failure = first_line(e)
        log.debug("model failed on %s", ", ".join(str(item.job.input) for item in batch), exc_info=True)
    if failure is not None:  # (out of the except block: the error's traceback no longer holds device memory)
        if len(batch) > 1:
            log.debug("batch of %d failed (%s); retrying one by one", len(batch), failure)
            return [r for item in batch for r in compute([item], fn, dtype, budget, compile)]
        return [(batch[0], FileError(batch[0].job.input, f"model failed ({failure})"), False)]
    results = []
    for i, item in enumerate(batch):
        y = out[i : i + 1]
        redone = False
        if not finite(y):
            if dtype != torch.float32:
                try:
                    y = _run(model, fn, item.data, device, torch.float32, budget, compile)
                except RuntimeError as e:
                    results.append((item, FileError(item.job.input, f"model failed ({first_line(e)})"), False))
                    continue
                redone = True
            if not finite(y):
                results.append((item, FileError(item.job.input, f"the model's output has {NON_FINITE}"), redone))
                continue
        results.append((item, y, redone))
    return results


def _run(
    model,
    fn,
    x: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    budget: int | None = None,
    compile: bool = False,
) -> torch.Tensor:
    """``fn(model, x)`` on ``device`` in ``dtype`` within ``budget`` (None: the device's default),
    the output back on the CPU. Out of memory, it is computed again in tiles (``speed.oom``).
    ``fn`` gets the model as ``dtype`` runs it (``compute_model``: on CUDA in reduced precision,
    a copy with cast weights; float32 always ``model`` itself)."""
    budget = budget or default_budget(device)
    runner = compute_model(model, device, dtype)
    x = x.to(device)
    if x.dim() == 4 and x.is_floating_point():
        x = x.contiguous(memory_format=memory_format_for(dtype, device))

    def attempt(bytes_: int) -> torch.Tensor:
        with compute_context(device, dtype, model=runner, budget=bytes_, compile=compile):
            return fn(runner, x)

    y = retry_in_tiles(attempt, budget, device=device)
    release_heap_above(budget)  # (inside a run: what it keeps between images)
    return y.detach().to("cpu")




def _compute_and_write(stream, batch_size: int, how, finish, options) -> Iterator[FileResult]:
    """The loop of encode and decode: ``stream``'s items in batches, computed as ``how(batch)``
    says (the function and the dtype), each output handed to ``finish`` (which writes it and
    gives its result) in the write-behind thread, in order. Results already made (skipped or
    failed inputs) pass through. The memory budget (``options.max_memory``, by default from the
    memory free now on the model's device) is fixed for the run."""
    budget = options.max_memory
    writer = WriteBehind(enabled=options.io_threads > 0)
    try:
        for batch in batched(stream, batch_size):
            if isinstance(batch, FileResult):
                yield batch
                continue
            if budget is None:
                budget = default_budget(next(batch[0].model.parameters()).device)
            fn, dtype = how(batch)
            for item, out, redone in compute(batch, fn, dtype, budget, options.compile):
                yield from writer.submit(lambda a=(item, out, redone): finish(*a))
        yield from writer.drain()
    except KeyboardInterrupt:
        yield from writer.drain()  # files being written are finished: report them
        raise
    finally:
        writer.close()


def each_job(
    jobs, prepare: Callable[[Job], Any], *, overwrite: bool, ours, workers: int = 0, ahead: int = 4, stale=None
) -> Iterator[Any]:
    """``prepare(job)`` for each job whose output is not in the way; failed or skipped results
    pass through, and a ``FileError`` becomes that job's failed result. With ``workers``, that
    many threads prepare up to ``ahead`` jobs ahead of the consumer (results in order).
    ``stale``: see ``check_existing``."""

    def one(job):
        if isinstance(job, FileResult):
            return job
        sweep_stale(job.output.parent)  # what killed runs left there (once per folder)
        done = check_existing(job, overwrite=overwrite, ours=ours, stale=stale)
        if done is not None:
            return done
        try:
            return prepare(job)
        except FileError as e:
            return _from_error(job, e)

    yield from ordered_map(one, jobs, workers=workers, ahead=ahead)


def _write(job: Job, write: Callable[[], None], redone: bool, info: dict) -> FileResult:
    try:
        write()
    except FileExistsError as e:
        if os.path.lexists(job.output):  # the final rename found a file there: another run was quicker
            return FileResult(job.input, job.output, SKIPPED, "exists (written meanwhile by another run)", job=job)
        return FileResult(job.input, job.output, FAILED, f"cannot write {job.output} ({e.strerror or e})", job=job)
    except OSError as e:
        result = FileResult(job.input, job.output, FAILED, f"cannot write {job.output} ({e.strerror or e})", job=job)
        if is_out_of_space(e):
            raise StopRun(result) from e
        return result
    return FileResult(job.input, job.output, DONE, fallback_fp32=redone, info=info, job=job)
