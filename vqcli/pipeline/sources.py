"""Jobs from tar shards and manifests, and resume: what is already done."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from vqcli.errors import FileError
from vqcli.io import tarfiles as tario
from vqcli.io.images import (
    DEFAULT_MAX_PIXELS,
    is_image_path,
    load_image,
    load_image_bytes,
    member_too_large,
)
from vqcli.io.manifest import Entry
from vqcli.io.relpaths import UnsafePath, describe, split_rel
from vqcli.pipeline.jobs import Claims, _size, output_path
from vqcli.pipeline.results import (
    DONE,
    FAILED,
    SKIPPED,
    FileResult,
    Job,
    MemberJob,
    TarJob,
)


def expand_tars(
    items: Iterable[Any],
    name: Callable[[str], str],
    accept: Callable[[str], bool] = is_image_path,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Iterator[Any]:
    """Each ``TarJob`` with a folder output as a ``MemberJob`` per image inside; all else as it is."""
    for item in items:
        if isinstance(item, TarJob) and not item.to_tar:
            yield from member_jobs(item, name, accept, max_pixels)
        else:
            yield item


def member_jobs(
    tar: TarJob,
    name: Callable[[str], str],
    accept: Callable[[str], bool] = is_image_path,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Iterator[MemberJob | FileResult]:
    """The image members of one tar as jobs, read front to back; a member ``d/m`` has the output
    ``tar.output/d/name(m)``.

    A member with an unsafe name, a link, one too large for ``max_pixels`` (from its size and its
    image header, before it is read), or one whose output an earlier member of the same name
    claimed, fails; a tar that cannot be read fails as a whole (after the members before the
    damage). Per member only a 64-bit digest of its output is kept (to catch repeated names).
    """
    wanted = None if tar.members is None else (lambda m: m.as_posix() in tar.members)
    claimed: set[int] = set()
    check = None if max_pixels is None else (lambda size, head: member_too_large(size, head, max_pixels))
    try:
        for m in tario.read_members(tar.input, accept, wanted, check):
            job = MemberJob(
                tar.input / m.name,
                tar.root,
                tar.rel / m.name,
                tar.output / m.name,
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
            try:
                job = replace(job, output=output_path(tar.output, m.name, name))
            except UnsafePath as e:
                yield FileResult(job.input, None, FAILED, f"not written: {e}", job=job)
                continue
            key = int.from_bytes(hashlib.blake2b(os.fsencode(os.path.normcase(str(job.output))), digest_size=8).digest(), "little")
            if key in claimed:
                reason = "the tar holds an earlier member of the same name; only that one is used"
                yield FileResult(job.input, job.output, FAILED, reason, job=job)
                continue
            claimed.add(key)
            yield job
    except FileError as e:
        yield FileResult(tar.input, tar.output, FAILED, e.reason, job=tar)


def load_job_image(job: Job, max_pixels: int | None = DEFAULT_MAX_PIXELS, details: dict | None = None) -> np.ndarray:
    """The image of a job: a file, or a tar member's bytes (``details``: see ``load_image``)."""
    if isinstance(job, MemberJob):
        return load_image_bytes(job.data, job.input, max_pixels=max_pixels, details=details)
    return load_image(job.input, max_pixels=max_pixels, details=details)


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
) -> Iterator[Job | FileResult]:
    """The jobs of the manifest lines that are not finished: failed, never run, or whose output is
    gone. Outputs are named as a fresh run over the same inputs would name them, through
    ``jobs.output_path``: a line whose ``rel`` or ``member`` would lead outside the output folder
    fails, whatever its spelling. Two lines of different sources with one output: the second fails,
    as in a run over folders; when its ``rel`` was not given (a list of sources made by another
    tool), it is the source's whole path instead of its name, so both are done.

    Lines of members of one tar become one ``TarJob`` (in the place of the first) reading only those
    members; with ``tar_output``, the shard's output tar is made again, whole.
    """
    tars: dict[str, dict[str, Any]] = {}
    made: dict[str, bool] = {}  # tar_output: whether a tar's output tar is there
    order: list[Job | FileResult | str] = []
    claims = Claims(output_dir)
    for e in entries:
        try:
            item = _entry_job(e, output_dir, name, tar_output, claims, tars, made)
        except UnsafePath as problem:
            shown = Path(e.source.replace("\0", "\\0"))
            order.append(FileResult(shown, None, FAILED, f"manifest line not used: its {problem}"))
            continue
        if item is not None:
            order.append(item)
    for item in order:
        if isinstance(item, str):
            t, source = tars[item], Path(item)
            members = None if (t["all"] or tar_output) else frozenset(t["members"])
            yield TarJob(source, source.parent, t["rel"], t["output"], members=members, to_tar=tar_output, redo=tar_output)
        else:
            yield item


def _entry_job(e: Entry, output_dir: Path, name, tar_output: bool, claims: Claims, tars: dict, made: dict):
    """One manifest line: a ``Job``, a failed result, a tar's source (its first line) or None."""
    if "\0" in e.source:
        raise UnsafePath("source holds a NUL character")
    source = Path(e.source)
    if e.member is None and not tario.is_tar_path(e.source):
        rel = PurePosixPath(*_split("rel", e.rel))
        output = output_path(output_dir, rel, name)
        refused = claims.claim(source, output, output_dir)
        if refused is not None and not e.rel_given and refused.reason != "again":
            rel = PurePosixPath(*_split("source", os.path.abspath(e.source).lstrip("/")))
            output = output_path(output_dir, rel, name)
            refused = claims.claim(source, output, output_dir)
        if refused is not None:
            return None if refused.reason == "again" else refused
        if e.status in (DONE, SKIPPED) and os.path.lexists(output):
            return None
        root = Path(*source.parts[: -len(rel.parts)]) if source.parts[-len(rel.parts) :] == rel.parts else source.parent
        return Job(source, root, rel, output)
    rel = PurePosixPath(*_split("rel", e.rel))
    member = PurePosixPath(*_split("member", e.member)) if e.member else None
    tar_rel = rel
    if member is not None:
        n = len(member.parts)
        tar_rel = PurePosixPath(*rel.parts[:-n]) if len(rel.parts) > n and rel.parts[-n:] == member.parts else PurePosixPath(source.name)
    t = tars.get(e.source)
    out = t["output"] if t is not None else output_path(output_dir, tar_rel, tario.plain_name if tar_output else str)
    if t is None:
        refused = claims.claim(source, out, output_dir)
        if refused is not None:
            return None if refused.reason == "again" else refused
    if e.status in (DONE, SKIPPED):
        if tar_output:
            if e.source not in made:
                made[e.source] = out.is_file() and tario.is_vqcli_tar(out)
            present = made[e.source]
        elif member is None:
            present = out.is_dir()
        else:
            present = os.path.lexists(output_path(out, member, name))
        if present:
            if t is None:
                tars[e.source] = {"rel": tar_rel, "output": out, "members": set(), "all": False, "listed": False}
            return None
    first = t is None or not t["listed"]
    if t is None:
        t = tars[e.source] = {"rel": tar_rel, "output": out, "members": set(), "all": False, "listed": True}
    t["listed"] = True
    if member is None:
        t["all"] = True
    else:
        t["members"].add(member.as_posix())
    return e.source if first else None


def _split(field: str, text: str) -> tuple[str, ...]:
    try:
        return split_rel(text)
    except UnsafePath as e:
        raise UnsafePath(f"{field} {describe(text)} is unsafe ({e})") from None


def check_existing(
    job: Job,
    *,
    overwrite: bool,
    ours: Callable[[Path], bool],
    stale: Callable[[Job, Path], str | None] | None = None,
) -> FileResult | None:
    """``None`` when ``job`` should run; a skipped or failed result when its output is in the way.

    An existing output that vqcli wrote is skipped (resume) or, with ``overwrite``, replaced; but
    one that ``stale(job, output)`` finds made otherwise than this run would (another input, model
    or options, see ``vqcli.pipeline.provenance``) fails with that reason. Any other file in the
    way (an original image, someone's file) is never replaced.
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
    reason = stale(job, out) if stale is not None else None
    if reason is not None:
        return FileResult(job.input, out, FAILED, reason, job=job)
    return FileResult(job.input, out, SKIPPED, "exists", job=job)
