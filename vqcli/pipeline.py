"""The batch pipeline: from input paths to one result per file. Prints nothing.

``encode_files`` and ``decode_files`` are generators of ``FileResult``. Each is a chain of small
stages, each one function, so that each can be replaced on its own (tiling for large images in
``compute``, a share of the inputs per process in front of ``find_jobs``):

    find_jobs          walk the inputs (streaming), name each output, refuse collisions; tar
                       shards become a ``TarJob`` each (``find_units``); or, from a manifest,
                       the lines not finished (``jobs_from_entries``)
    select_jobs        number the blocks batches never cross (``number_blocks``); with a share
                       (torchrun rank, ``--shard I/N``), list everything, split the blocks by size
                       (``vqcli.shards``) and keep this process's
    expand_tars        read each tar shard front to back: a ``MemberJob`` per image inside
    check_existing     skip finished outputs (resume); never touch files vqcli did not write
    prepare_image      load, pad and record the original size  |  prepare_latent: read, validate,
                                                                   choose and check the model
                       (``io_threads``: in worker threads, ahead of the model, in order)
    batched            group items of equal shape, at most ``batch_size``, few held back
    compute            run the model on a batch under inference mode; a batch that fails is
                       retried one item at a time; non-finite outputs in reduced precision are
                       redone in float32 (reported in the result)
    write_latent / save_image   atomic writes (temporary name, then rename); with
                       ``--tar-output``, a tar shard's latents go into one tar written atomically;
                       (``io_threads``: on one thread behind the model, in order; on Ctrl-C the
                       writes under way finish and are reported, see ``cli.common.last_results``)

A failure in one file (``FileError``) becomes that file's result and the others go on. Memory
stays flat over any number of files: files are found while they are processed (a share needs
the whole list first: it keeps one number per block), and at most a few batches of images are
held at once. Each result carries its job (``FileResult.job``), from which ``entry_of`` makes the
manifest line.

Output names: each input's path relative to the folder it was found in (a file named directly:
its name) is mirrored under the output folder. Encoding appends ``.safetensors`` to the whole
image name (``a.png`` -> ``a.png.safetensors``, so ``a.png`` and ``a.jpg`` never collide).
Decoding strips ``.safetensors``; the remaining name is kept when its extension already is the
output format's (``a.png.safetensors`` -> ``a.png``) and gets the format's extension appended
otherwise (``a.jpg.safetensors`` -> ``a.jpg.png``). Output paths come only from input paths, never
from anything inside a file. Two inputs that would write the same output (the same relative path
under two input folders) are refused, the second one failing with a message.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from . import latents as lat
from . import shards, tario
from .accel import compute_context, fast_allocator, memory_format_for, release_heap_above
from .autoencoder import AutoEncoder
from .errors import FileError, UsageError, VqcliError
from .fileio import TMP_PREFIX, is_out_of_space, sweep_stale
from .overlap import WriteBehind, ordered_map
from .images import DEFAULT_MAX_PIXELS, OUTPUT_FORMATS, format_matches, is_image_path, load_image, save_image
from .images import written_by_vqcli
from .manifest import Entry
from .models import ModelRef, is_embedded, resolve_model, with_factors
from .padding import from_model_output, pad_to_multiple, to_model_input
from .shards import Share
from .tiling import default_budget

log = logging.getLogger(__name__)

DONE, SKIPPED, FAILED = "done", "skipped", "failed"


# --- results and jobs -----------------------------------------------------------------------------


@dataclass
class FileResult:
    """What happened to one input file."""

    input: Path
    output: Path | None
    status: str  # DONE, SKIPPED or FAILED
    reason: str = ""  # why it was skipped or failed
    fallback_fp32: bool = False  # reduced precision gave NaN/Inf; redone in float32
    info: dict[str, Any] = field(default_factory=dict)  # width, height, ...
    job: Job | None = field(default=None, repr=False, compare=False)  # the job it is the result of

    @property
    def message(self) -> str:
        """``path: reason``, as printed for failures."""
        return f"{self.input}: {self.reason}"


@dataclass(frozen=True)
class Job:
    """One input file and the output it becomes."""

    input: Path
    root: Path  # the folder it was found in (for a file named directly, the folder holding it)
    rel: PurePosixPath  # its path relative to ``root``
    output: Path
    size: int = -1  # bytes of the input (-1: not looked up)
    block: int = 0  # items of different blocks never share a batch (see ``number_blocks``)


@dataclass(frozen=True)
class TarJob(Job):
    """A tar shard of images (``input``): each image member becomes a ``MemberJob``, its output
    under the folder ``output``, or, with ``to_tar``, inside the tar ``output``."""

    members: frozenset[str] | None = None  # only these members (a re-run from a manifest); None: all
    to_tar: bool = False
    redo: bool = False  # to_tar: an output tar of vqcli's may be replaced (a re-run from a manifest)


@dataclass(frozen=True)
class MemberJob(Job):
    """One image inside a tar: ``input`` is ``tar/member`` (for messages), ``data`` its bytes."""

    tar: Path = Path()
    member: PurePosixPath = PurePosixPath()
    mtime: int = 0
    data: bytes = field(default=b"", repr=False, compare=False)


class StopRun(VqcliError):
    """A fault after which no later file can succeed either (the disk is full): ``result`` is the
    file it happened to. The pipeline raises it and stops; the files not reached are left to a re-run."""

    def __init__(self, result: FileResult):
        super().__init__(result.message)
        self.result = result


def _failed(path: Path, reason: str, output: Path | None = None) -> FileResult:
    return FileResult(Path(path), output, FAILED, reason)


def _from_error(job: Job, e: FileError) -> FileResult:
    # Name the input even when the error is about the output.
    reason = e.reason if Path(e.path) == job.input else f"{e.path}: {e.reason}"
    return FileResult(job.input, job.output, FAILED, reason, job=job)


# --- finding inputs and naming outputs ------------------------------------------------------------


def is_latent_path(path: str | os.PathLike) -> bool:
    return Path(path).name.lower().endswith(lat.SUFFIX)


def encoded_name(image_name: str) -> str:
    """``a.png`` -> ``a.png.safetensors``."""
    return image_name + lat.SUFFIX


def decoded_name(latent_name: str, fmt: str) -> str:
    """``a.png.safetensors`` -> ``a.png``; ``a.jpg.safetensors`` -> ``a.jpg.png`` (for ``png``)."""
    if fmt not in OUTPUT_FORMATS:
        raise UsageError(f"unknown image format {fmt!r} (use {', '.join(OUTPUT_FORMATS)})")
    base = latent_name[: -len(lat.SUFFIX)] if is_latent_path(latent_name) else latent_name
    if not base:
        base = "image"
    return base if format_matches(base, fmt) else f"{base}.{fmt}"


def check_inputs(paths: Sequence[Path], output_dir: Path | None = None) -> None:
    """Every input named on the command line must exist and the output must be a folder (typos are
    usage errors, found before any work)."""
    if not paths:
        raise UsageError("no inputs given")
    for p in paths:
        if not os.path.lexists(p):
            raise UsageError(f"{p}: no such file or folder")
    if output_dir is not None and os.path.lexists(output_dir) and not Path(output_dir).is_dir():
        raise UsageError(f"{output_dir}: the output must be a folder, and this is a file")


def walk(
    paths: Sequence[Path], accept: Callable[[str], bool], *, exclude: Path | None = None
) -> Iterator[tuple[Path, Path, PurePosixPath] | FileResult]:
    """``(file, root, relative path)`` for each input, in sorted order, as it is found.

    Folders are walked recursively (following symbolic links, each real folder once, so that link
    loops end), taking the files ``accept`` (given the name) approves; files named directly are
    taken whatever their name. ``exclude`` (the output folder) is not walked into. Folders that
    cannot be read give a failed ``FileResult``.
    """
    for path in paths:
        path = Path(path)
        if path.is_dir():
            seen: set[str] = set()
            yield from _walk_dir(path, path, accept, seen, _real(exclude) if exclude else None)
        else:
            yield path, path.parent, PurePosixPath(path.name)


def _real(path: Path) -> str:
    return os.path.realpath(path)


def _walk_dir(root: Path, folder: Path, accept, seen: set[str], exclude: str | None):
    real = _real(folder)
    if real in seen:
        return
    seen.add(real)
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        yield _failed(folder, f"cannot read folder ({e.strerror or e})")
        return
    for entry in entries:
        if entry.name.startswith(TMP_PREFIX):
            continue  # an unfinished write of an interrupted run
        path = Path(entry.path)
        try:
            is_dir = entry.is_dir()  # follows symbolic links
        except OSError:
            is_dir = False
        if is_dir:
            if exclude is None or _real(path) != exclude:
                yield from _walk_dir(root, path, accept, seen, exclude)
        elif accept(entry.name):
            yield path, root, PurePosixPath(path.relative_to(root).as_posix())


def find_jobs(
    paths: Sequence[Path],
    output_dir: Path,
    *,
    accept: Callable[[str], bool],
    name: Callable[[str], str],
) -> Iterator[Job | FileResult]:
    """A ``Job`` per input file (or a failed result for one that cannot be used), streaming."""
    out_real = _real(output_dir)
    claimed: dict[str, Path] = {}  # output -> the input that claimed it (one short string each)
    for item in walk(paths, accept, exclude=output_dir):
        if isinstance(item, FileResult):
            yield item
            continue
        path, root, rel = item
        output = output_dir.joinpath(*rel.parent.parts, name(rel.name))
        key = os.path.normcase(os.path.join(out_real, *rel.parent.parts, name(rel.name)))
        if key in claimed:
            if _real(claimed[key]) == _real(path):
                continue  # the same file named twice (a folder and a file in it, say): done once
            yield _failed(
                path,
                f"its output {output} is also the output of {claimed[key]} (the same relative path "
                "under two inputs); give them separate output folders",
                output,
            )
            continue
        if _real(path) == _real(output):
            yield _failed(path, "its output would be the input itself; choose another output folder", output)
            continue
        claimed[key] = path
        yield Job(path, root, rel, output)


def count_inputs(paths: Sequence[Path], accept: Callable[[str], bool], *, exclude: Path | None = None) -> int:
    """How many files ``walk`` will give (names only: cheap, for the progress bar)."""
    return sum(1 for item in walk(paths, accept, exclude=exclude) if not isinstance(item, FileResult))


def image_jobs(paths: Sequence[Path], output_dir: Path, *, tar_output: bool = False) -> Iterator[Job | FileResult]:
    """Images and tar shards of images (see ``find_units``)."""
    return find_units(paths, output_dir, accept=is_image_path, name=encoded_name, tar_output=tar_output)


def find_units(
    paths: Sequence[Path],
    output_dir: Path,
    *,
    accept: Callable[[str], bool],
    name: Callable[[str], str],
    tar_output: bool = False,
) -> Iterator[Job | FileResult]:
    """``find_jobs`` that also takes tar shards (``tario.TAR_SUFFIXES``), as a ``TarJob`` each.

    A tar's output is the folder ``OUT/rel-of-the-tar/`` holding its members' outputs (mirroring
    ``shard.tar/member``) or, with ``tar_output``, the tar ``OUT/rel-of-the-tar`` (plain, not
    compressed) holding them.
    """

    def unit_name(n: str) -> str:
        if not tario.is_tar_path(n):
            return name(n)
        return tario.plain_name(n) if tar_output else n

    for item in find_jobs(paths, output_dir, accept=lambda n: accept(n) or tario.is_tar_path(n), name=unit_name):
        if isinstance(item, Job) and tario.is_tar_path(item.input.name):
            item = TarJob(item.input, item.root, item.rel, item.output, to_tar=tar_output)
        yield item


def latent_jobs(paths: Sequence[Path], output_dir: Path, fmt: str) -> Iterator[Job | FileResult]:
    return find_jobs(paths, output_dir, accept=is_latent_path, name=lambda n: decoded_name(n, fmt))


# --- this process's share of the inputs ------------------------------------------------------------

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
    owner = shards.assign(weights, share.count)
    again = hashlib.sha256()
    for item in number_blocks(make(), size):
        again.update(_list_key(item))
        if isinstance(item, FileResult):
            if share.index == 0:
                yield item
        elif item.block < len(owner) and owner[item.block] == share.index:
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


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


# --- tar shards -----------------------------------------------------------------------------------


def expand_tars(
    items: Iterable[Any], name: Callable[[str], str], accept: Callable[[str], bool] = is_image_path
) -> Iterator[Any]:
    """Each ``TarJob`` with a folder output as a ``MemberJob`` per image inside; all else as it is."""
    for item in items:
        if isinstance(item, TarJob) and not item.to_tar:
            yield from member_jobs(item, name, accept)
        else:
            yield item


def member_jobs(
    tar: TarJob, name: Callable[[str], str], accept: Callable[[str], bool] = is_image_path
) -> Iterator[MemberJob | FileResult]:
    """The image members of one tar as jobs, read front to back; a member ``d/m`` has the output
    ``tar.output/d/name(m)``.

    A member with an unsafe name, or whose output an earlier member of the same name claimed,
    fails; a tar that cannot be read fails as a whole (after the members before the damage).
    """
    wanted = None if tar.members is None else (lambda m: m.as_posix() in tar.members)
    claimed: set[str] = set()
    try:
        for m in tario.read_members(tar.input, accept, wanted):
            inside = PurePosixPath(*(part for part in m.name.parts if part != "/"))  # "/a.png" -> "a.png"
            job = MemberJob(
                tar.input / inside,
                tar.root,
                tar.rel / inside,
                tar.output.joinpath(*inside.parent.parts, name(inside.name)),
                size=m.size,
                block=tar.block,
                tar=tar.input,
                member=m.name,
                mtime=m.mtime,
                data=m.data or b"",
            )
            if m.problem:
                yield FileResult(job.input, None, FAILED, m.problem, job=job)
                continue
            if m.data is None:
                continue  # not wanted
            key = os.path.normcase(str(job.output))
            if key in claimed:
                reason = "the tar holds an earlier member of the same name; only that one is used"
                yield FileResult(job.input, job.output, FAILED, reason, job=job)
                continue
            claimed.add(key)
            yield job
    except FileError as e:
        yield FileResult(tar.input, tar.output, FAILED, e.reason, job=tar)


def load_job_image(job: Job, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The image of a job: a file, or a tar member's bytes."""
    if isinstance(job, MemberJob):
        return tario.load_image_bytes(job.data, job.input, max_pixels=max_pixels)
    return load_image(job.input, max_pixels=max_pixels)


# --- manifests ------------------------------------------------------------------------------------


def entry_of(result: FileResult, output_dir: Path) -> Entry:
    """A result as a manifest line (the fields: see ``vqcli.manifest``)."""
    job = result.job
    if isinstance(job, MemberJob):
        source, member, size = os.path.abspath(job.tar), job.member.as_posix(), job.size
    else:
        source, member = os.path.abspath(result.input), None
        size = job.size if job is not None and job.size >= 0 else _size(result.input)
    rel = job.rel.as_posix() if job is not None else Path(result.input).name
    output = None
    if result.output is not None:
        output = Path(os.path.relpath(os.path.abspath(result.output), os.path.abspath(output_dir))).as_posix()
    error = result.reason if result.status == FAILED else None
    return Entry(source, member, rel, output, size if size >= 0 else None, result.status, error)


def jobs_from_entries(
    entries: Iterable[Entry], output_dir: Path, *, name: Callable[[str], str], tar_output: bool = False
) -> Iterator[Job]:
    """The jobs of the manifest lines that are not finished: failed, never run, or whose output is
    gone. Outputs are named as a fresh run over the same inputs would name them.

    Lines of members of one tar become one ``TarJob`` (in the place of the first) reading only those
    members; with ``tar_output``, the shard's output tar is made again, whole.
    """
    tars: dict[str, dict[str, Any]] = {}
    made: dict[str, bool] = {}  # tar_output: whether a tar's output tar is there
    order: list[Entry | str] = []
    for e in entries:
        rel = PurePosixPath(e.rel)
        if e.member is None and not tario.is_tar_path(e.source):
            if e.status in (DONE, SKIPPED) and os.path.lexists(output_dir.joinpath(*rel.parent.parts, name(rel.name))):
                continue
            order.append(e)
            continue
        member = PurePosixPath(e.member) if e.member else None
        tar_rel = rel
        if member is not None:
            n = len(member.parts)
            tar_rel = PurePosixPath(*rel.parts[:-n]) if len(rel.parts) > n and rel.parts[-n:] == member.parts else PurePosixPath(Path(e.source).name)
        out = output_dir / (tario.plain_name(tar_rel.as_posix()) if tar_output else tar_rel.as_posix())
        if e.status in (DONE, SKIPPED):
            if tar_output:
                if e.source not in made:
                    made[e.source] = out.is_file() and tario.is_vqcli_tar(out)
                present = made[e.source]
            elif member is None:
                present = out.is_dir()
            else:
                present = os.path.lexists(out.joinpath(*member.parent.parts, name(member.name)))
            if present:
                continue
        t = tars.get(e.source)
        if t is None:
            t = tars[e.source] = {"rel": tar_rel, "output": out, "members": set(), "all": False}
            order.append(e.source)
        if member is None:
            t["all"] = True
        else:
            t["members"].add(member.as_posix())
    for item in order:
        if isinstance(item, Entry):
            rel, source = PurePosixPath(item.rel), Path(item.source)
            root = Path(*source.parts[: -len(rel.parts)]) if source.parts[-len(rel.parts):] == rel.parts else source.parent
            yield Job(source, root, rel, output_dir.joinpath(*rel.parent.parts, name(rel.name)))
        else:
            t, source = tars[item], Path(item)
            members = None if (t["all"] or tar_output) else frozenset(t["members"])
            yield TarJob(source, source.parent, t["rel"], t["output"], members=members, to_tar=tar_output, redo=tar_output)


# --- resuming -------------------------------------------------------------------------------------


def check_existing(job: Job, *, overwrite: bool, ours: Callable[[Path], bool]) -> FileResult | None:
    """``None`` when ``job`` should run; a skipped or failed result when its output is in the way.

    An existing output that vqcli wrote is skipped (resume) or, with ``overwrite``, replaced. Any
    other file in the way (an original image, someone's file) is never replaced.
    """
    out = job.output
    if not os.path.lexists(out):
        return None
    if out.is_dir() or out.is_symlink():
        return FileResult(job.input, out, FAILED, f"output {out} exists and is a folder or a link; not replaced", job=job)
    if not ours(out):
        return FileResult(
            job.input,
            out,
            FAILED,
            f"output {out} exists and was not written by vqcli (an original?); not replaced",
            job=job,
        )
    if overwrite:
        return None
    return FileResult(job.input, out, SKIPPED, "exists", job=job)


# --- batching and computing -----------------------------------------------------------------------


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


def compute(
    batch: list[Item],
    fn: Callable[[AutoEncoder, torch.Tensor], torch.Tensor],
    dtype: torch.dtype,
    budget: int | None = None,
    compile: bool = False,
) -> list[tuple[Item, torch.Tensor | FileError, bool]]:
    """Run ``fn(model, inputs)`` over a batch: ``(item, output or error, redone in float32)`` each.

    A batch that fails as a whole (out of memory, say) is retried one item at a time, so that only
    the items that fail on their own are reported. A floating output with NaN or Inf values is
    redone in float32 when ``dtype`` is reduced precision, and an error otherwise. ``budget``
    bounds the memory of one layer's work (see ``vqcli.tiling``; None: from the free memory);
    ``compile`` runs what fits whole torch.compile'd.
    """
    model = batch[0].model
    device = next(model.parameters()).device
    try:
        out = _run(model, fn, torch.cat([item.data for item in batch]), device, dtype, budget, compile)
    except RuntimeError as e:
        if len(batch) > 1:
            log.debug("batch of %d failed (%s); retrying one by one", len(batch), e)
            return [r for item in batch for r in compute([item], fn, dtype, budget, compile)]
        log.debug("model failed on %s", batch[0].job.input, exc_info=True)
        return [(batch[0], FileError(batch[0].job.input, f"model failed ({_first_line(e)})"), False)]
    results = []
    for i, item in enumerate(batch):
        y = out[i : i + 1]
        redone = False
        if y.is_floating_point() and not bool(torch.isfinite(y).all()):
            if dtype != torch.float32:
                try:
                    y = _run(model, fn, item.data, device, torch.float32, budget, compile)
                except RuntimeError as e:
                    results.append((item, FileError(item.job.input, f"model failed ({_first_line(e)})"), False))
                    continue
                redone = True
            if not bool(torch.isfinite(y).all()):
                results.append((item, FileError(item.job.input, "the model's output has NaN or infinite values"), redone))
                continue
        results.append((item, y, redone))
    return results


def _run(
    model, fn, x: torch.Tensor, device: torch.device, dtype: torch.dtype, budget: int | None = None, compile: bool = False
) -> torch.Tensor:
    x = x.to(device)
    if x.dim() == 4 and x.is_floating_point():
        x = x.contiguous(memory_format=memory_format_for(dtype))
    with compute_context(device, dtype, model=model, budget=budget, compile=compile):
        y = fn(model, x)
    release_heap_above(budget or default_budget())  # (what a run keeps between images)
    return y.detach().to("cpu")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


# --- encoding -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodeOptions:
    batch_size: int = 1
    sample: bool = False  # KL: a draw from the latent distribution instead of its mean
    seed: int | None = None  # with sample: each image's draw is seeded from this and its path
    scaled: bool = False  # KL: write diffusion-ready (z - shift) * scale
    overwrite: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    max_memory: int | None = None  # bytes for one layer's work; None: from the free memory
    tar_output: bool = False  # a tar shard's latents go into one tar, not a folder
    io_threads: int = 1  # threads loading images ahead (plus one writing behind); 0: none
    compile: bool = False  # torch.compile the coders (images that fit whole; see vqcli.tiling)


def encode_files(
    inputs: Sequence[Path],
    output_dir: Path,
    model: AutoEncoder,
    ref: ModelRef,
    *,
    dtype: torch.dtype = torch.float32,
    options: EncodeOptions = EncodeOptions(),
    selection: Selection = Selection(),
) -> Iterator[FileResult]:
    """Encode every image among ``inputs`` into a latent file under ``output_dir``.

    ``model`` is ready for inference (``models.resolve_model``); ``ref`` names it in the files.
    ``selection`` chooses this process's share, or takes the inputs from a manifest.
    """
    check_encode_options(model, options)
    if selection.entries is None:
        check_inputs(inputs, output_dir)
    seed = options.seed if options.seed is not None else (secrets.randbits(62) if options.sample else None)
    # A draw is seeded per image, so it must not depend on the company in its batch.
    batch_size = 1 if options.sample else options.batch_size

    make = image_source(inputs, output_dir, selection, tar_output=options.tar_output)
    jobs = select_jobs(make, selection, block_size(batch_size))
    for into_tar, group in itertools.groupby(jobs, key=lambda j: isinstance(j, TarJob) and j.to_tar):
        if into_tar:
            for tar in group:
                yield from _encode_into_tar(tar, model, ref, seed, batch_size, dtype, options)
        else:
            yield from _encode_stream(expand_tars(group, encoded_name), model, ref, seed, batch_size, dtype, options)


def _encode_stream(jobs, model, ref, seed, batch_size, dtype, options, put=None) -> Iterator[FileResult]:
    """Load, batch, encode and write the images of ``jobs`` (into files, or with ``put``)."""
    stream = each_job(
        jobs,
        lambda job: prepare_image(job, model, max_pixels=options.max_pixels),
        overwrite=options.overwrite,
        ours=lat.is_latent_file,
        workers=options.io_threads,
        ahead=2 * batch_size + 1,
    )

    def how(batch: list[Item]):
        if not options.sample:
            return _encode_fn(model.config.kind, sample=False, scaled=options.scaled, seed=None), dtype
        image_seed = derive_seed(seed, batch[0].job.rel)
        batch[0].info["seed"] = image_seed
        return _encode_fn(model.config.kind, sample=True, scaled=options.scaled, seed=image_seed), dtype

    finish = functools.partial(_finish_encode, ref=ref, options=options, put=put)
    yield from _compute_and_write(stream, batch_size, how, finish, options)


def _compute_and_write(stream, batch_size: int, how, finish, options) -> Iterator[FileResult]:
    """The loop of encode and decode: ``stream``'s items in batches, computed as ``how(batch)``
    says (the function and the dtype), each output handed to ``finish`` (which writes it and
    gives its result) in the write-behind thread, in order. Results already made (skipped or
    failed inputs) pass through. The heap stays paged in from one batch to the next; the memory
    budget (``options.max_memory``, by default from the memory free now) is fixed for the run."""
    budget = options.max_memory or default_budget()
    writer = WriteBehind(enabled=options.io_threads > 0)
    try:
        with fast_allocator():  # held over the run; each batch's compute_context alone trimmed it
            for batch in batched(stream, batch_size):
                if isinstance(batch, FileResult):
                    yield batch
                    continue
                fn, dtype = how(batch)
                for item, out, redone in compute(batch, fn, dtype, budget, options.compile):
                    yield from writer.submit(lambda a=(item, out, redone): finish(*a))
        yield from writer.drain()
    except KeyboardInterrupt:
        yield from writer.drain()  # files being written are finished: report them
        raise
    finally:
        writer.close()


def _encode_into_tar(tar: TarJob, model, ref, seed, batch_size, dtype, options) -> Iterator[FileResult]:
    """Encode a tar shard's images into the tar ``tar.output`` (``shard.tar/KEY.jpg`` ->
    ``KEY.jpg.safetensors`` in it). The tar appears whole, or not at all; its members' results
    are given once it is there. An output tar that exists is skipped (resume) unless
    ``--overwrite``, or ``tar.redo`` and it is vqcli's."""
    out = tar.output
    if os.path.lexists(out) and not (tar.redo and out.is_file() and tario.is_vqcli_tar(out)):
        done = check_existing(tar, overwrite=options.overwrite, ours=tario.is_vqcli_tar)
        if done is not None:
            yield done
            return
    results: list[FileResult] = []
    try:
        with tario.write_tar(out, overwrite=os.path.lexists(out)) as sink:

            def put(job: Job, data: bytes) -> None:
                sink.add(job.output.relative_to(out).as_posix(), data, job.mtime)

            for result in _encode_stream(member_jobs(tar, encoded_name), model, ref, seed, batch_size, dtype, options, put):
                results.append(result)
    except FileExistsError:
        yield FileResult(tar.input, out, SKIPPED, "exists (written meanwhile by another run)", job=tar)
        return
    except OSError as e:
        yield FileResult(tar.input, out, FAILED, f"cannot write {out} ({e.strerror or e})", job=tar)
        return
    yield from results


def latent_bytes(tensor: torch.Tensor, meta: lat.LatentMeta) -> bytes:
    """A latent file's bytes, as ``latents.write_latent`` writes them (for a member of a tar)."""
    from safetensors.torch import save

    stored = lat.to_storage(tensor, meta)
    if tuple(stored.shape) != meta.latent_shape:
        raise ValueError(f"latent shape {tuple(stored.shape)} does not match its metadata {meta.latent_shape}")
    return save({lat.KEY: stored}, metadata=meta.to_metadata())


def check_encode_options(model: AutoEncoder, options: EncodeOptions) -> None:
    if options.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if model.config.kind == "vq" and (options.sample or options.scaled):
        raise UsageError("--sample and --scaled apply to KL models; a VQ model's latents are codebook indices")


def derive_seed(seed: int, rel: PurePosixPath) -> int:
    """The seed of one image's draw: from the run's seed and the image's relative path."""
    digest = hashlib.sha256(f"{seed}\0{rel.as_posix()}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def each_job(
    jobs, prepare: Callable[[Job], Any], *, overwrite: bool, ours, workers: int = 0, ahead: int = 4
) -> Iterator[Any]:
    """``prepare(job)`` for each job whose output is not in the way; failed or skipped results
    pass through, and a ``FileError`` becomes that job's failed result. With ``workers``, that
    many threads prepare up to ``ahead`` jobs ahead of the consumer (results in order)."""

    def one(job):
        if isinstance(job, FileResult):
            return job
        sweep_stale(job.output.parent)  # what killed runs left there (once per folder)
        done = check_existing(job, overwrite=overwrite, ours=ours)
        if done is not None:
            return done
        try:
            return prepare(job)
        except FileError as e:
            return _from_error(job, e)

    yield from ordered_map(one, jobs, workers=workers, ahead=ahead)


def prepare_image(job: Job, model: AutoEncoder, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Item:
    """Load an image, pad it to the model's factor and note its original size."""
    rgb = load_job_image(job, max_pixels=max_pixels)
    height, width = rgb.shape[:2]
    x = pad_to_multiple(to_model_input(rgb), lat.pad_factor(height, width, model.config.downsampling))
    return Item(job, x, key=tuple(x.shape), model=model, info={"width": width, "height": height})


def _encode_fn(kind: str, *, sample: bool, scaled: bool, seed: int | None):
    if kind == "vq":
        return lambda model, x: model.encode_indices(x)

    def encode(model: AutoEncoder, x: torch.Tensor) -> torch.Tensor:
        generator = None
        if sample:
            generator = torch.Generator(device=x.device)
            generator.manual_seed(seed)
        return model.encode(x, sample=sample, generator=generator, scaled=scaled).float()

    return encode


def _finish_encode(item: Item, out, redone: bool, ref: ModelRef, options: EncodeOptions, put=None) -> FileResult:
    job = item.job
    if isinstance(out, FileError):
        return _from_error(job, out)
    model = item.model
    meta = lat.make_meta(
        model,
        source=job.rel.as_posix(),
        width=item.info["width"],
        height=item.info["height"],
        model_name=ref.name,
        model_embedded=ref.embedded,
        representation="indices" if model.config.kind == "vq" else ("sample" if options.sample else "mean"),
        scaled=options.scaled,
        seed=item.info.get("seed"),
    )
    if put is not None:
        return _write(job, lambda: put(job, latent_bytes(out[0], meta)), redone, item.info)
    return _write(job, lambda: lat.write_latent(job.output, out[0], meta, overwrite=options.overwrite), redone, item.info)


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


# --- decoding -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeOptions:
    batch_size: int = 1
    fmt: str = "png"
    quality: int = 95
    overwrite: bool = False
    max_memory: int | None = None  # bytes for one layer's work; None: from the free memory
    io_threads: int = 1  # threads reading latents ahead (plus one writing images behind); 0: none
    compile: bool = False  # torch.compile the coders (images that fit whole; see vqcli.tiling)


class ModelChooser:
    """Which model decodes a latent: the one given (checked against the file), or the embedded one
    the file names. Models are loaded once and kept for the run.

    ``dtype=None`` (``--dtype auto``): each embedded model is computed in the precision
    ``accel.choose_dtype`` measures for it; ``on_choice(name, choice)`` hears of each choice.
    """

    def __init__(
        self,
        model: AutoEncoder | None = None,
        label: str = "",
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = torch.float32,
        resolve: Callable[..., AutoEncoder] = resolve_model,
        on_choice: Callable[[str, Any], None] | None = None,
    ):
        self.model, self.label = model, label
        self.device, self.dtype, self.resolve = device, dtype, resolve
        self.on_choice = on_choice
        self._embedded: dict[str, AutoEncoder | VqcliError] = {}
        self._views: dict[tuple, AutoEncoder] = {}
        self._dtypes: dict[int, torch.dtype] = {}  # id(model or view) -> its precision under auto
        self._lock = threading.Lock()

    def dtype_for(self, model: AutoEncoder) -> torch.dtype:
        """The precision to compute ``model`` (as this chooser returned it) in."""
        return self._dtypes.get(id(model), self.dtype or torch.float32)

    def __call__(self, path: Path, meta: lat.LatentMeta) -> AutoEncoder:
        with self._lock:  # latents are read (and models loaded) from worker threads
            return self._choose(path, meta)

    def _choose(self, path: Path, meta: lat.LatentMeta) -> AutoEncoder:
        if self.model is not None:
            model, label = self.model, self.label
        elif meta.model_embedded and is_embedded(meta.model):
            model, label = self._embedded_model(path, meta.model), f"the embedded model {meta.model!r}"
        else:
            raise FileError(
                path,
                f"made by the model file {meta.model!r} (sha256 {meta.model_sha256[:12]}); pass that file with --model",
            )
        lat.check_model(path, meta, model, label)
        if not meta.scaled:
            return model
        key = (id(model), meta.scale_factor, meta.shift_factor)
        if key not in self._views:
            self._views[key] = with_factors(model, meta.scale_factor, meta.shift_factor)
            if id(model) in self._dtypes:
                self._dtypes[id(self._views[key])] = self._dtypes[id(model)]
        return self._views[key]

    def _embedded_model(self, path: Path, name: str) -> AutoEncoder:
        if name not in self._embedded:
            try:
                model = self.resolve(name, device=self.device, dtype=self.dtype or torch.float32)
                if self.dtype is None:
                    from .accel import choose_dtype

                    choice = choose_dtype(model, torch.device(self.device))
                    self._dtypes[id(model)] = choice.dtype
                    if self.on_choice is not None:
                        self.on_choice(name, choice)
                self._embedded[name] = model
            except VqcliError as e:
                self._embedded[name] = e
        found = self._embedded[name]
        if isinstance(found, VqcliError):
            raise FileError(path, f"made by the embedded model {name!r}, which cannot be loaded: {found}")
        return found


def decode_files(
    inputs: Sequence[Path],
    output_dir: Path,
    models: ModelChooser,
    *,
    dtype: torch.dtype = torch.float32,
    options: DecodeOptions = DecodeOptions(),
    selection: Selection = Selection(),
) -> Iterator[FileResult]:
    """Decode every latent file among ``inputs`` into an image under ``output_dir``.

    ``selection`` chooses this process's share, or takes the inputs from a manifest.
    """
    if options.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    decoded_name("x", options.fmt)  # validates the format
    if selection.entries is None:
        check_inputs(inputs, output_dir)
    stream = each_job(
        select_jobs(latent_source(inputs, output_dir, selection, options.fmt), selection, block_size(options.batch_size)),
        lambda job: prepare_latent(job, models),
        overwrite=options.overwrite,
        ours=written_by_vqcli,
        workers=options.io_threads,
        ahead=2 * options.batch_size + 1,
    )

    def how(batch: list[Item]):
        fn = _decode_fn(batch[0].info["kind"], batch[0].info["scaled"])
        return fn, models.dtype_for(batch[0].model) if models.dtype is None else dtype

    finish = functools.partial(_finish_decode, options=options)
    yield from _compute_and_write(stream, options.batch_size, how, finish, options)


def prepare_latent(job: Job, models: ModelChooser) -> Item:
    """Read and validate a latent file and choose (and check) the model that decodes it."""
    latent = lat.read_latent(job.input)
    meta = latent.meta
    model = models(job.input, meta)
    if meta.kind == "vq":
        data = latent.tensor.long().unsqueeze(0)
    else:
        data = latent.tensor.float().unsqueeze(0)
    info = {"width": meta.width, "height": meta.height, "kind": meta.kind, "scaled": meta.scaled}
    return Item(job, data, key=(id(model), meta.kind, meta.scaled, tuple(data.shape)), model=model, info=info)


def _decode_fn(kind: str, scaled: bool):
    if kind == "vq":
        return lambda model, idx: model.decode_indices(idx)
    return lambda model, z: model.decode(z, scaled=scaled)


def _finish_decode(item: Item, out, redone: bool, options: DecodeOptions) -> FileResult:
    job = item.job
    if isinstance(out, FileError):
        return _from_error(job, out)
    info = {"width": item.info["width"], "height": item.info["height"]}
    rgb = from_model_output(out[0], info["height"], info["width"])
    return _write(
        job,
        lambda: save_image(rgb, job.output, fmt=options.fmt, quality=options.quality, overwrite=options.overwrite),
        redone,
        info,
    )


# --- in-memory helpers (for the library user and other commands) ---------------------------------


def encode_array(
    model: AutoEncoder, rgb: np.ndarray, *, dtype: torch.dtype = torch.float32, budget: int | None = None
) -> torch.Tensor:
    """One (H, W, 3) [0, 1] image to its latent (KL mean ``(C, h, w)`` or VQ indices ``(h, w)``);
    ``budget`` as ``--max-memory`` (None: from the memory free now)."""
    height, width = rgb.shape[:2]
    x = pad_to_multiple(to_model_input(rgb), lat.pad_factor(height, width, model.config.downsampling))
    device = next(model.parameters()).device
    fn = _encode_fn(model.config.kind, sample=False, scaled=False, seed=None)
    return _run(model, fn, x, device, dtype, budget)[0]


def decode_array(
    model: AutoEncoder,
    latent: torch.Tensor,
    height: int,
    width: int,
    *,
    dtype: torch.dtype = torch.float32,
    budget: int | None = None,
) -> np.ndarray:
    """Inverse of ``encode_array``: the latent back to an (height, width, 3) [0, 1] image."""
    kind = model.config.kind
    data = (latent.long() if kind == "vq" else latent.float()).unsqueeze(0)
    device = next(model.parameters()).device
    y = _run(model, _decode_fn(kind, False), data, device, dtype, budget)
    return from_model_output(y[0], height, width)
