"""Tar shards in and out: images inside WebDataset-style ``.tar`` files, latents written to tars.

Large training sets come as tar shards of a few thousand samples each (WebDataset): members named
``KEY.jpg``, ``KEY.json``, ``KEY.cls`` ..., read front to back. Here:

- ``read_members`` streams a tar once, sequentially (``tarfile``'s stream mode, so plain, gzip,
  bzip2 and xz tars are read without seeking), giving the regular-file members a filter accepts,
  in tar order, each with its bytes, and nothing kept per member. Member names are checked
  (``vqcli.io.relpaths``): an absolute name, one with a ``..`` part, a backslash or too deep is
  never used (it could name a file outside the output folder); ``./a.jpg`` is ``a.jpg``. Links are
  reported, not followed; a member too large for ``check`` is never read.
- ``vqcli.io.images.load_image_bytes`` decodes a member exactly as
  ``images.load_image`` decodes a file, naming the member in errors.
- ``write_tar`` writes a tar atomically (temporary name, then rename), in the POSIX pax format,
  with a global header marking it as vqcli's (``is_vqcli_tar``), so that a later run may replace
  it and never replaces anyone else's tar. Members are written with fixed owner and mode and the
  source member's time, so the same inputs give the same bytes.

The pipeline (``vqcli.pipeline``) turns members into jobs; nothing here knows about models.
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from vqcli.errors import FileError, first_line
from vqcli.io.atomic import atomic_path
from vqcli.io.relpaths import UnsafePath, describe, split_rel

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


MARK_KEY, MARK = "VQCLI.software", "vqcli"  # the pax global header of tars vqcli wrote


def is_tar_path(path: str | os.PathLike) -> bool:
    return Path(path).name.lower().endswith(TAR_SUFFIXES)


def plain_name(tar_name: str) -> str:
    """A tar's name without its compression suffix: ``a.tar.gz`` -> ``a.tar`` (outputs are plain)."""
    lower = tar_name.lower()
    for suffix in (".tar.gz", ".tar.bz2", ".tar.xz"):
        if lower.endswith(suffix):
            return tar_name[: -len(suffix)] + ".tar"
    return tar_name[:-4] + ".tar" if lower.endswith(".tgz") else tar_name


@dataclass(frozen=True)
class Member:
    """One regular-file member of a tar."""

    name: PurePosixPath  # normalised ("./a.jpg" -> "a.jpg")
    size: int
    mtime: int
    data: bytes | None = field(default=None, repr=False)  # None: not read (not wanted, or unsafe)
    problem: str = ""  # why it cannot be used (an unsafe name); empty when it can


def member_name(raw: str) -> tuple[PurePosixPath, str]:
    """The normalised name of a member and, when it must not be used, why (``relpaths.split_rel``)."""
    try:
        return PurePosixPath(*split_rel(raw)), ""
    except UnsafePath as e:
        return PurePosixPath(raw.replace("\0", "").lstrip("/") or "?"), f"its name {describe(raw)} is unsafe ({e}); not used"


HEAD_BYTES = 64 * 1024  # what ``check`` sees of a member before the rest is read


def read_members(
    path: Path,
    accept: Callable[[str], bool],
    wanted: Callable[[PurePosixPath], bool] | None = None,
    check: Callable[[int, bytes], str] | None = None,
) -> Iterator[Member]:
    """The regular-file members whose names ``accept`` (given the base name) approves, in order.

    Only members ``wanted`` approves (default: all) are read; the others are passed over without
    their bytes. ``check(size, head)``, given a member's size from its header and its first
    ``HEAD_BYTES``, returns why the member must not be read whole (too large) or ``""``; a refused
    member is passed over unread, so a small compressed tar holding a huge member costs no memory.
    Link members (hard or symbolic) whose names ``accept`` approves are given with a problem, never
    followed. Nothing is kept per member: memory does not grow with the number of members. A tar
    that cannot be opened or is damaged raises ``FileError`` naming it, after the members before
    the damage.
    """
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for info in tf:
                tf.members.clear()  # stream mode would keep every header read (hundreds of bytes each)
                if not (info.isfile() or info.islnk() or info.issym()) or not accept(PurePosixPath(info.name).name):
                    continue
                name, problem = member_name(info.name)
                if not problem and not info.isfile():
                    kind = "a hard link" if info.islnk() else "a symbolic link"
                    problem = f"{kind} (to {info.linkname[:200]!r}); links inside tars are not followed, not used"
                if problem or (wanted is not None and not wanted(name)):
                    yield Member(name, info.size, int(info.mtime), None, problem)
                    continue
                f = tf.extractfile(info)
                head = f.read(min(info.size, HEAD_BYTES)) if f is not None else b""
                refused = check(info.size, head) if check is not None else ""
                if refused:
                    yield Member(name, info.size, int(info.mtime), None, refused)
                    continue
                rest = f.read(info.size - len(head)) if f is not None and info.size > len(head) else b""
                yield Member(name, info.size, int(info.mtime), head + rest)
    except FileNotFoundError:
        raise FileError(path, "no such file") from None
    except PermissionError:
        raise FileError(path, "permission denied") from None
    except IsADirectoryError:
        raise FileError(path, "is a folder, not a tar file") from None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise FileError(path, f"cannot read tar ({first_line(e)})") from None


def count_members(path: Path, accept: Callable[[str], bool]) -> int:
    """How many members ``read_members`` would give (headers only, nothing kept; for progress bars)."""
    n = 0
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for info in tf:
                tf.members.clear()
                if (info.isfile() or info.islnk() or info.issym()) and accept(PurePosixPath(info.name).name):
                    n += 1
    except (tarfile.TarError, OSError, EOFError):
        pass
    return n


class TarSink:
    """Members on their way into one tar (see ``write_tar``)."""

    def __init__(self, tf: tarfile.TarFile):
        self._tf = tf
        self.count = 0

    def add(self, name: PurePosixPath | str, data: bytes, mtime: int = 0) -> None:
        info = tarfile.TarInfo(str(name))
        info.size, info.mtime, info.mode = len(data), max(int(mtime), 0), 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tf.addfile(info, io.BytesIO(data))
        self.count += 1


@contextlib.contextmanager
def write_tar(path: Path, *, overwrite: bool = False) -> Iterator[TarSink]:
    """A ``TarSink`` for a tar that appears under ``path`` complete, when the block ends without an
    exception, or not at all (``FileExistsError`` if ``path`` exists and not ``overwrite``)."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT, pax_headers={MARK_KEY: MARK}) as tf:
            yield TarSink(tf)


def is_vqcli_tar(path: str | os.PathLike) -> bool:
    """True when ``path`` is a tar that ``write_tar`` wrote (its first header only is read)."""
    try:
        with tarfile.open(path, mode="r:") as tf:
            return tf.pax_headers.get(MARK_KEY) == MARK
    except (tarfile.TarError, OSError, EOFError):
        return False
