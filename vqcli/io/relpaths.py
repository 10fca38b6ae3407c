"""Relative paths that came from a file (a manifest's ``rel``, a tar member's name): checked before
they name anything on disk.

An output path is made only from parts that are plain names: never absolute, never ``..`` or
``.``, no empty part, no NUL, no backslash (a Windows separator that a later tool may honour), not
deeper than ``MAX_DEPTH``. ``inside`` then checks, on disk, that a path made of them stays inside
its folder even through symbolic links already there. Every place that names an output from such
text goes through ``split_rel`` (``vqcli.pipeline.jobs.output_path``), so no spelling escapes.
"""

from __future__ import annotations

import os
from pathlib import PurePosixPath

MAX_DEPTH = 1024  # folders inside one another, far past any real dataset; deeper is refused


class UnsafePath(ValueError):
    """A relative path that must not name a file; ``str()`` says why, in a few words."""


def split_rel(text: str | PurePosixPath) -> tuple[str, ...]:
    """The parts of a relative path (``/`` separated), or ``UnsafePath`` saying why it is unsafe.

    ``./a/./b`` is ``('a', 'b')`` (a harmless spelling); anything that could lead elsewhere than
    below the folder it is joined to is refused rather than repaired.
    """
    raw = text.as_posix() if isinstance(text, PurePosixPath) else text
    if not isinstance(raw, str) or not raw:
        raise UnsafePath("it is empty")
    if "\0" in raw:
        raise UnsafePath("it holds a NUL character")
    if "\\" in raw:
        raise UnsafePath("it holds a backslash (a Windows separator)")
    if raw.startswith("/"):
        raise UnsafePath("it is an absolute path")
    parts = tuple(p for p in raw.split("/") if p not in ("", "."))
    if not parts:
        raise UnsafePath("it names no file")
    if ".." in parts:
        raise UnsafePath("it leads out of its folder ('..')")
    if len(parts) > MAX_DEPTH:
        raise UnsafePath(f"it is {len(parts)} folders deep (over {MAX_DEPTH})")
    return parts


def inside(folder: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether ``path``, with the symbolic links already on disk resolved, lies below ``folder``."""
    top = os.path.realpath(folder)
    real = os.path.realpath(path)
    return real != top and real.startswith(top.rstrip(os.sep) + os.sep)


def describe(text: str, limit: int = 120) -> str:
    """A path from a file, fit for a one-line message: quoted, control characters escaped, cut short."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"

