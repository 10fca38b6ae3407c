"""Which files ``--overwrite`` may replace: only those vqcli wrote, in every command.

One rule: an output that does not exist is written; one that exists is replaced only with
``overwrite`` and only when vqcli wrote it (a safetensors file whose metadata names one of
vqcli's formats, or an image carrying vqcli's EXIF mark); a folder or a link in its place, or
anyone else's file (a photograph, a PNG someone named ``x.safetensors``), is never replaced.
Both are read from the file's header only.
"""

from __future__ import annotations

import os
from pathlib import Path

from vqcli.errors import FileError
from vqcli.io.images import written_by_vqcli
from vqcli.io.safetensors import read_safetensors_header

FORMAT_PREFIX = "vqcli."  # vqcli.latent, vqcli.weights, vqcli.features


def is_ours(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file vqcli wrote (its header says so)."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    try:
        header = read_safetensors_header(path)
    except (FileError, OSError):
        return written_by_vqcli(path)
    meta = header.get("__metadata__")
    return isinstance(meta, dict) and str(meta.get("format", "")).startswith(FORMAT_PREFIX)


def check_replaceable(path: str | os.PathLike, *, overwrite: bool) -> None:
    """Nothing when ``path`` may be written (see the module's rule); else a ``FileError`` saying why."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    if not overwrite:
        raise FileError(path, "already exists (pass --overwrite to replace it)")
    if path.is_symlink() or path.is_dir():
        raise FileError(path, "exists and is a folder or a link; not replaced")
    if not is_ours(path):
        raise FileError(path, "exists and was not written by vqcli; not replaced (--overwrite replaces only vqcli's own files)")
