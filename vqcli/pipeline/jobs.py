"""Finding the inputs and naming each output: jobs and their results."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath

from vqcli.errors import UsageError
from vqcli.io import latents as lat
from vqcli.io import tarfiles as tario
from vqcli.io.atomic import TMP_PREFIX
from vqcli.io.images import OUTPUT_FORMATS, format_matches, is_image_path
from vqcli.pipeline.results import FileResult, Job, TarJob, _failed

log = logging.getLogger(__name__)




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


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1

