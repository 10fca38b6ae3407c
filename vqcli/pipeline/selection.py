"""Blocks, shares and sources: which jobs this process runs, in which order."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from vqcli.errors import VqcliError
from vqcli.io import tarfiles as tario
from vqcli.io.images import is_image_path
from vqcli.io.manifest import Entry
from vqcli.pipeline import shards
from vqcli.pipeline.jobs import (
    _size,
    decoded_name,
    encoded_name,
    find_units,
    latent_jobs,
)
from vqcli.pipeline.results import FileResult, Job, TarJob
from vqcli.pipeline.shards import Share
from vqcli.pipeline.sources import jobs_from_entries

BLOCK_BATCHES = 16  # with --batch-size B > 1, blocks of 16 B files (see ``number_blocks``)


@dataclass(frozen=True)
class Selection:
    """Which inputs a run takes, and from where.

    ``share``: this process's share (``vqcli.shards``); None: all of them, streamed as found.
    ``entries``: a function giving the lines of a manifest to take the inputs from (only the
    failed and missing ones are done) instead of walking the inputs.
    ``listed``: called, before any work, with a digest of the whole list of inputs (names and
    sizes) and its length; torchrun's ranks check that they all found the same inputs.
    """

    share: Share | None = None
    entries: Callable[[], Iterable[Entry]] | None = None
    listed: Callable[[str, int], None] | None = None


def block_size(batch_size: int) -> int:
    """Files per block: 1 without batching; ``BLOCK_BATCHES * batch_size`` with."""
    return 1 if batch_size <= 1 else BLOCK_BATCHES * batch_size


def number_blocks(items: Iterable[Job | FileResult], size: int) -> Iterator[Job | FileResult]:
    """Give each job its block: ``size`` consecutive files, or one tar shard.

    Blocks are the units shares are made of, and ``batched`` never puts two blocks in one batch:
    PyTorch's result for an image can differ in the last bits with the other images of its batch
    (measured: the first convolution on the CPU), so a batch must hold the same images however the
    inputs are split. Blocks depend only on the list of inputs and the batch size.
    """
    block, filled = 0, 0
    for item in items:
        if isinstance(item, FileResult):
            yield item
            continue
        tar = isinstance(item, TarJob)
        if filled and (tar or filled >= size):
            block, filled = block + 1, 0
        yield replace(item, block=block)
        filled += 1
        if tar:
            block, filled = block + 1, 0


def select_jobs(
    make: Callable[[], Iterable[Job | FileResult]], selection: Selection, size: int
) -> Iterator[Job | FileResult]:
    """The jobs of this process, in blocks: all of ``make()`` (streamed), or its share.

    A share needs the whole list (the split balances sizes), so the inputs are listed twice: once
    for the blocks' sizes (only those are kept, so memory stays small for millions of files), then
    for this share's jobs. Failures of the listing itself (unreadable folders, collisions) belong
    to share 0. A list that changed between the two passes is an error: the shares of processes
    that listed it at other times would no longer fit together.
    """
    share = selection.share
    if share is None:
        yield from number_blocks(make(), size)
        return
    weights: list[int] = []
    names, sized = hashlib.sha256(), hashlib.sha256()
    total = 0
    for item in number_blocks(make(), size):
        total += 1
        key = _list_key(item)
        names.update(key)
        if isinstance(item, FileResult):
            sized.update(key)
            continue
        nbytes = _size(item.input)
        sized.update(key + f"{nbytes}\n".encode())
        weights.extend([0] * (item.block + 1 - len(weights)))
        weights[item.block] += shards.unit_weight([nbytes])
    if selection.listed is not None:
        selection.listed(sized.hexdigest(), total)
    mine = shards.select(weights, share)
    again = hashlib.sha256()
    for item in number_blocks(make(), size):
        again.update(_list_key(item))
        if isinstance(item, FileResult):
            if share.index == 0 and share.rank == 0:
                yield item
        elif item.block < len(mine) and mine[item.block]:
            yield item
    if again.digest() != names.digest():
        raise VqcliError(
            "the inputs changed while this run was listing them (files added, removed or renamed), so the "
            "shares may no longer fit together; rerun when they are stable (finished outputs are kept)"
        )


def image_source(
    inputs: Sequence[Path],
    output_dir: Path,
    selection: Selection,
    *,
    name: Callable[[str], str] = encoded_name,
    tar_output: bool = False,
) -> Callable[[], Iterable[Job | FileResult]]:
    """The function that lists the jobs of a run over images: from a manifest, or by walking."""

    def make() -> Iterable[Job | FileResult]:
        if selection.entries is not None:
            return jobs_from_entries(selection.entries(), output_dir, name=name, tar_output=tar_output)
        return find_units(inputs, output_dir, accept=is_image_path, name=name, tar_output=tar_output)

    return make


def latent_source(
    inputs: Sequence[Path], output_dir: Path, selection: Selection, fmt: str
) -> Callable[[], Iterable[Job | FileResult]]:
    """The function that lists the jobs of a run over latent files: from a manifest, or by walking."""

    def make() -> Iterable[Job | FileResult]:
        if selection.entries is not None:
            return jobs_from_entries(selection.entries(), output_dir, name=lambda n: decoded_name(n, fmt))
        return latent_jobs(inputs, output_dir, fmt)

    return make


def count_selected(
    make: Callable[[], Iterable[Job | FileResult]],
    selection: Selection,
    size: int,
    accept: Callable[[str], bool] = is_image_path,
) -> int:
    """How many results a run over ``make()``'s jobs gives (tar headers only; for progress bars)."""
    n = 0
    for item in select_jobs(make, replace(selection, listed=None), size):
        if isinstance(item, TarJob):
            n += len(item.members) if item.members is not None else tario.count_members(item.input, accept)
        elif isinstance(item, Job):
            n += 1
    return n


def _list_key(item: Job | FileResult) -> bytes:
    if isinstance(item, FileResult):
        return f"!{item.input}\0{item.reason}\n".encode("utf-8", "surrogateescape")
    return f"{item.input}\0{item.output}\0{item.block}\n".encode("utf-8", "surrogateescape")

