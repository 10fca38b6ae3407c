"""Atomic file writing: a file appears complete under its final name, or not at all.

Every output is written to a temporary name beside it and renamed into place. A temporary name
says who wrote it: ``.vqcli-tmp-<pid>-<host>-<random><suffix>``. A run killed with ``kill -9`` (or
by a power cut) leaves its temporary files behind; the next run that writes into the same folder
removes those whose writer is gone: written on this host by a process that no longer exists, or,
when that cannot be told (another host's, an unknown name, a process number taken again),
untouched for a day. The files a running process is writing are left alone, so that two runs can
share an output folder.

Writers that fail for lack of space raise ``OSError`` (safetensors' and ``torch.save``'s own errors
are translated), so that callers can tell a full disk from a bad input.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)
TMP_PREFIX = ".vqcli-tmp-"


# A temporary name whose writer cannot be checked is stale once untouched for this long.
STALE_AFTER_S = 24 * 3600
_OLD_TAG = "-old"  # a folder holding what an overwrite replaced, until the new one is in place
_lock = threading.Lock()
_live: set[str] = set()  # names of the temporary files and folders this process is writing now
_swept: set[str] = set()  # folders already swept by this process


def _host() -> str:
    name = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:40]
    return name or "host"


_HOST = _host()
_NAME = re.compile(re.escape(TMP_PREFIX) + r"(\d+)-([A-Za-z0-9._]*)-[0-9a-f]{8}")


def _temp_path(parent: Path, suffix: str = "") -> Path:
    return parent / f"{TMP_PREFIX}{os.getpid()}-{_HOST}-{secrets.token_hex(4)}{suffix}"


def _new_temp(parent: Path, suffix: str, make) -> Path:
    """Create a temporary file or folder (``make(path)``, exclusive) and register it as live."""
    for _ in range(100):
        tmp = _temp_path(parent, suffix)
        with _lock:
            _live.add(tmp.name)
        try:
            make(tmp)
            return tmp
        except FileExistsError:
            _forget(tmp)
        except BaseException:
            _forget(tmp)
            raise
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(parent))


def _forget(tmp: Path) -> None:
    with _lock:
        _live.discard(tmp.name)


def _make_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return True
    return True


def is_stale(path: Path, *, now: float | None = None) -> bool:
    """Whether a temporary file or folder was left by a writer that is gone (see the module)."""
    name = path.name
    if not name.startswith(TMP_PREFIX):
        return False
    m = _NAME.match(name)
    if m and m.group(2) == _HOST:
        pid = int(m.group(1))
        if pid == os.getpid():
            with _lock:
                return name not in _live  # an earlier process with our number (a container's pid 1)
        if not _alive(pid):
            return True
    # another host's, an unknown name, or a number now used by another process: by its age
    try:
        mtime = path.lstat().st_mtime
    except FileNotFoundError:
        return False
    return (now if now is not None else time.time()) - mtime > STALE_AFTER_S


def sweep_stale(folder: str | os.PathLike) -> int:
    """Remove the stale temporary files and folders in ``folder`` (not below it); how many.

    Each folder is swept once per process (later calls are a set lookup). A folder left by a
    diffusers-folder overwrite that was killed between its two renames gives back the model it
    held when nothing took its place.
    """
    key = os.fspath(folder)
    with _lock:
        if key in _swept:
            return 0
        _swept.add(key)
    removed = 0
    try:
        with os.scandir(key) as it:
            candidates = [Path(e.path) for e in it if e.name.startswith(TMP_PREFIX)]
    except OSError:
        return 0
    now = time.time()
    for path in candidates:
        if not is_stale(path, now=now):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                if path.name.endswith(_OLD_TAG):
                    _restore(path)
                shutil.rmtree(path)
            else:
                path.unlink()
            removed += 1
            log.info("removed %s, left by an interrupted run", path)
        except FileNotFoundError:
            pass  # another run removed it first
        except OSError as e:
            log.warning("cannot remove %s, left by an interrupted run (%s)", path, e.strerror or e)
    return removed


def _restore(old: Path) -> None:
    """Put back what an interrupted overwrite moved aside, when nothing took its place."""
    for entry in list(old.iterdir()):
        final = old.parent / entry.name
        if not os.path.lexists(final):
            os.rename(entry, final)
            log.warning("restored %s: the run replacing it was interrupted", final)


def make_folders(folder: str | os.PathLike) -> None:
    """``mkdir -p`` without recursion (``Path.mkdir(parents=True)`` recurses once per missing
    folder, and a tree a thousand folders deep overflows Python's stack)."""
    folder = Path(folder)
    missing = []
    while not os.path.isdir(folder):
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    for f in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(f)
        if not os.path.isdir(f):
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(f))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it into place.

    On any exception the temporary file is removed and nothing appears under ``path``. With
    ``overwrite=False`` an existing ``path`` is left alone and ``FileExistsError`` raised (the final
    step is a hard link, which fails if another process created the file meanwhile). A writer's
    failure to write (a full disk, say) comes out as ``OSError``, whichever library wrote.
    """
    final = Path(path)
    make_folders(final.parent)
    sweep_stale(final.parent)
    tmp = _new_temp(final.parent, final.suffix, _make_file)
    try:
        yield tmp
        # the temporary file is 0600, and some writers (safetensors) replace it: set the usual mode last
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, final)
        else:
            os.link(tmp, final)
            tmp.unlink()
    except Exception as e:
        translated = None if isinstance(e, OSError) else as_os_error(e, final)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if translated is not None:
            raise translated from e
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    finally:
        _forget(tmp)


def make_temp_dir(parent: str | os.PathLike, *, old: bool = False) -> Path:
    """A new temporary folder in ``parent`` (for writers of several files, renamed into place by
    the caller). ``old``: a folder to move a replaced output into until the new one is in place,
    so that an interrupted replacement can be undone. The caller removes it when done."""
    parent = Path(parent)
    make_folders(parent)
    sweep_stale(parent)
    return _new_temp(parent, _OLD_TAG if old else "", lambda p: os.mkdir(p, 0o700))


def make_temp_file(parent: str | os.PathLike, suffix: str = "") -> Path:
    """A new empty temporary file in ``parent``, named as this process's, so that a run that finds
    it after this one was killed removes it. The caller renames or removes it."""
    parent = Path(parent)
    make_folders(parent)
    sweep_stale(parent)
    return _new_temp(parent, suffix, _make_file)


_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust's io::Error shows itself (safetensors)


def as_os_error(e: Exception, path: Path) -> OSError | None:
    """The ``OSError`` behind a writer library's own exception, or None when it is not one."""
    text = str(e)
    m = _OS_ERROR.search(text)
    if m:
        code = int(m.group(1))
        return OSError(code, os.strerror(code), str(path))
    if isinstance(e, RuntimeError) and "unexpected pos" in text:
        # torch.save's writer found a short write and says no more: a full disk, or a file size limit
        if _free_bytes(path.parent) < 1 << 20:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return OSError(errno.EIO, "the write stopped short (a file size limit?)", str(path))
    return None


def _free_bytes(folder: Path) -> int:
    try:
        st = os.statvfs(folder)
    except OSError:
        return 1 << 62
    return st.f_bavail * st.f_frsize


def is_out_of_space(e: BaseException) -> bool:
    """A full disk or an exhausted quota: no later write in the same place will succeed either."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def current_umask() -> int:
    """The process's umask (reading it means setting it; it is put straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> None:
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
