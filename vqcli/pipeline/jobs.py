"""Finding the inputs and naming each output: jobs and their results."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath

from vqcli.errors import UsageError
from vqcli.io import latents as lat
from vqcli.io import relpaths
from vqcli.io import tarfiles as tario
from vqcli.io.atomic import TMP_PREFIX
from vqcli.io.images import OUTPUT_FORMATS, format_matches, is_image_path
from vqcli.io.relpaths import UnsafePath, split_rel
from vqcli.io.trainer_files import COMFY_SUFFIX, KOHYA_SUFFIX, is_any_latent_path
from vqcli.pipeline.results import SKIPPED, FileResult, Job, TarJob, _failed

log = logging.getLogger(__name__)




def is_latent_path(path: str | os.PathLike) -> bool:
    """A latent file by its name, in any layout (vqcli, kohya's ``.npz``, ComfyUI's ``.latent``)."""
    return is_any_latent_path(path)


def encoded_name(image_name: str) -> str:
    """``a.png`` -> ``a.png.safetensors``."""
    return image_name + lat.SUFFIX


def decoded_name(latent_name: str, fmt: str) -> str:
    """``a.png.safetensors`` -> ``a.png``; ``a.jpg.safetensors`` -> ``a.jpg.png`` (for ``png``)."""
    if fmt not in OUTPUT_FORMATS:
        raise UsageError(f"unknown image format {fmt!r} (use {', '.join(OUTPUT_FORMATS)})")
    lower = latent_name.lower()
    suffix = next((s for s in (lat.SUFFIX, KOHYA_SUFFIX, COMFY_SUFFIX) if lower.endswith(s)), "")
    base = latent_name[: len(latent_name) - len(suffix)]
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


def output_path(folder: Path, rel: str | PurePosixPath, name: Callable[[str], str] = str) -> Path:
    """The output of the input at ``rel`` (its last part renamed by ``name``) inside ``folder``.

    The one place outputs are named from relative paths, whatever they came from (a walk, a
    manifest line, a tar member): ``rel`` must be a plain relative path (``relpaths.split_rel``) and
    the output, with the links already on disk resolved, must stay inside ``folder``; otherwise
    ``UnsafePath`` says why.
    """
    parts = split_rel(rel)
    renamed = name(parts[-1])
    if renamed != parts[-1]:
        split_rel(renamed)
    output = folder.joinpath(*parts[:-1], renamed)
    # directly in ``folder``: nothing to resolve (a link in the output's own place is never
    # followed: it is refused as an output in the way, or replaced by the rename)
    if len(parts) > 1 and not relpaths.inside(folder, output.parent):
        raise UnsafePath(f"its output {output} would lie outside {folder} (through a link)")
    return output


def walk(
    paths: Sequence[Path], accept: Callable[[str], bool], *, exclude: Path | None = None
) -> Iterator[tuple[Path, Path, PurePosixPath] | FileResult]:
    """``(file, root, relative path)`` for each input, in sorted order, as it is found.

    Folders are walked (following symbolic links, each real folder once, so that link loops end),
    taking the files ``accept`` (given the name) approves; files named directly are taken whatever
    their name. ``exclude`` (the output folder) is not walked into. Folders that cannot be read give
    a failed ``FileResult``. No recursion, and no cost growing with depth per folder: a tree
    thousands of folders deep is walked as fast as a wide one.
    """
    for path in paths:
        path = Path(path)
        if path.is_dir():
            yield from _walk_dir(path, accept, _identity(exclude) if exclude else None)
        else:
            yield path, path.parent, PurePosixPath(path.name)


def _identity(path: Path | str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _walk_dir(root: Path, accept, exclude: tuple[int, int] | None):
    """The files below ``root`` in the order a recursive walk would give them (each folder's entries
    sorted by name, a subfolder's files at its place), with a stack of folders instead of recursion."""
    seen: set[tuple[int, int]] = set()
    stack: list[tuple[Iterator[os.DirEntry], tuple[str, ...]]] = []

    def enter(folder: Path | str, rel: tuple[str, ...]) -> FileResult | None:
        ident = _identity(folder)
        if ident is not None:
            if ident in seen:
                return None
            seen.add(ident)
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            return _failed(Path(folder), f"cannot read folder ({e.strerror or e})")
        stack.append((iter(entries), rel))
        return None

    problem = enter(root, ())
    if problem is not None:
        yield problem
    while stack:
        entries, rel = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        if entry.name.startswith(TMP_PREFIX):
            continue  # an unfinished write of an interrupted run
        try:
            is_dir = entry.is_dir()  # follows symbolic links
        except OSError:
            is_dir = False
        if is_dir:
            if exclude is None or _identity(entry.path) != exclude:
                problem = enter(entry.path, (*rel, entry.name))
                if problem is not None:
                    yield problem
        elif accept(entry.name):
            yield Path(entry.path), root, PurePosixPath(*rel, entry.name)


def _real(path: Path | str) -> str:
    return os.path.realpath(path)


class Claims:
    """Which input claimed each output of a run, so that two inputs never share one output (one
    short string per output; the same file named twice is done once)."""

    def __init__(self, output_dir: Path):
        self._top = os.path.normcase(_real(output_dir))
        self._by: dict[str, Path] = {}

    def claim(self, source: Path, output: Path, output_dir: Path) -> FileResult | None:
        """``None`` when ``source`` may write ``output``; a failed result when another input did,
        or when the output is the input itself. ``source`` seen already for ``output``: a skipped
        result with the reason ``"again"`` (to be dropped)."""
        key = os.path.normcase(os.path.join(self._top, os.path.relpath(output, output_dir)))
        earlier = self._by.get(key)
        if earlier is not None:
            if _real(earlier) == _real(source):
                return FileResult(Path(source), output, SKIPPED, "again")
            return _failed(
                source,
                f"its output {output} is also the output of {earlier} (the same relative path "
                "under two inputs); give them separate output folders",
                output,
            )
        if _real(source) == _real(output):
            return _failed(source, "its output would be the input itself; choose another output folder", output)
        self._by[key] = Path(source)
        return None


def not_taken(
    paths: Sequence[Path], accept: Callable[[str], bool], *, exclude: Path | None = None, limit: int = 10
) -> tuple[list[Path], int]:
    """The files in the folders of ``paths`` that a walk leaves out because ``accept`` refuses
    their name: the first ``limit`` of them, and how many there are in all (for saying why a run
    found nothing to do)."""
    found: list[Path] = []
    count = 0
    for path in paths:
        path = Path(path)
        if not path.is_dir():
            continue
        for item in walk([path], lambda name: True, exclude=exclude):
            if isinstance(item, FileResult) or accept(item[0].name):
                continue
            count += 1
            if len(found) < limit:
                found.append(item[0])
    return found, count


def find_jobs(
    paths: Sequence[Path],
    output_dir: Path,
    *,
    accept: Callable[[str], bool],
    name: Callable[[str], str],
) -> Iterator[Job | FileResult]:
    """A ``Job`` per input file (or a failed result for one that cannot be used), streaming."""
    claims = Claims(output_dir)
    for item in walk(paths, accept, exclude=output_dir):
        if isinstance(item, FileResult):
            yield item
            continue
        path, root, rel = item
        try:
            output = output_path(output_dir, rel, name)
        except UnsafePath as e:
            yield _failed(path, f"not written: {e}")
            continue
        refused = claims.claim(path, output, output_dir)
        if refused is not None:
            if refused.reason != "again":
                yield refused
            continue
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

