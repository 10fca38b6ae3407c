"""``OUT/manifest.jsonl``: one JSON line per input, so that a later run or another tool can see what
exists without walking millions of files.

Each line is an object with, always, these keys:

==========  ==================================================================================
``source``  the input file, as an absolute path (for an image inside a tar: the tar)
``member``  the image's name inside the tar, or null
``rel``     the input's relative path: its output, its ``--sample`` seed and the ``source`` in
            its latent file come from it (``shard.tar/KEY.jpg`` for a tar member)
``output``  the output, relative to the manifest's folder (inside an output tar:
            ``shard.tar/KEY.jpg.safetensors``), or null
``bytes``   the input's size
``status``  ``done`` (written by this run), ``skipped`` (was there already) or ``failed``
``error``   why it failed, or null
==========  ==================================================================================

Lines are sorted by ``(source, member)``, so the file is the same whatever the number of
processes that made it. A run updates the manifest it finds: its own lines replace those of the
same inputs (except that "skipped" does not replace "done", which says more), the other lines stay.

Writing: every process (a torchrun rank, a ``--shard`` job, or the one process of a plain run)
writes its lines to a temporary file while it runs; at the end it sorts them into its part,
``manifest-part-I-of-N.jsonl``, and, under a lock on the folder, puts the part in place and, if
all N parts are there, merges them into ``manifest.jsonl`` and removes them. So whichever
process finishes last merges, with no coordination between them (SLURM array tasks never talk to
each other). A shard that never finished leaves the other parts waiting; rerunning it (it
resumes, skipping what exists) completes the manifest. The output folder must be one folder
shared by all processes (as it is for the outputs themselves).

Reading (``read_entries``) accepts lines with only ``source`` too (a list of inputs made by
another tool: ``rel`` is then the file name, and the status unknown).
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import json
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from vqcli.errors import UsageError
from vqcli.io.atomic import atomic_path, make_folders

MANIFEST = "manifest.jsonl"
LOCK = ".manifest.lock"
PART_HEADER = "vqcli_manifest_part"


DONE, SKIPPED, FAILED = "done", "skipped", "failed"


OWNED = ("source", "member", "rel", "output", "bytes", "status", "error")  # the fields vqcli writes
MAX_LINE = 1024 * 1024  # bytes: a manifest line longer than this is refused, not read


@dataclass(frozen=True)
class Entry:
    """One manifest line."""

    source: str
    member: str | None
    rel: str
    output: str | None
    bytes: int | None
    status: str | None
    error: str | None
    extra: str = field(default="", compare=False)  # the line's other fields (caption, label...), as JSON
    rel_given: bool = field(default=True, compare=False)  # False: ``rel`` is the file's name, by default

    @property
    def key(self) -> tuple[str, str]:
        return self.source, self.member or ""

    def line(self) -> str:
        fields = {name: getattr(self, name) for name in OWNED}
        if self.extra:
            fields.update(json.loads(self.extra))
        return json.dumps(fields, ensure_ascii=False)


def part_name(index: int, count: int, rank: int = 0, world: int = 1) -> str:
    """The part of share ``index`` of ``count``; with ``world`` > 1, that of one of its ranks."""
    ranks = f".rank-{rank}-of-{world}" if world > 1 else ""
    return f"manifest-part-{index}-of-{count}{ranks}.jsonl"


def parse_line(text: str, where: str) -> Entry:
    """One line to an ``Entry``, or a ``UsageError`` naming ``where`` (``file:line``)."""
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise UsageError(f"{where}: not JSON ({e})") from None
    except RecursionError:
        raise UsageError(f"{where}: not a manifest line (JSON nested too deep)") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("source"), str) or not obj["source"]:
        raise UsageError(f"{where}: a manifest line is a JSON object with a 'source' path")

    def text_or_none(name: str) -> str | None:
        value = obj.get(name)
        if value is not None and not isinstance(value, str):
            raise UsageError(f"{where}: {name!r} must be a string or null")
        return value

    member = text_or_none("member") or None
    rel = text_or_none("rel") or (member if member else Path(obj["source"]).name)
    size = obj.get("bytes")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise UsageError(f"{where}: 'bytes' must be a size in bytes or null")
    status = text_or_none("status")
    if status not in (None, DONE, SKIPPED, FAILED):
        raise UsageError(f"{where}: unknown status {status!r} (done, skipped, failed or null)")
    extra = {k: v for k, v in obj.items() if k not in OWNED}
    return Entry(
        obj["source"],
        member,
        rel,
        text_or_none("output"),
        size,
        status,
        text_or_none("error"),
        json.dumps(extra, ensure_ascii=False) if extra else "",
        bool(obj.get("rel")),
    )


def read_entries(path: Path) -> Iterator[Entry]:
    """The lines of a manifest (blank lines and part headers are passed over); a line that is not
    UTF-8 JSON, or longer than ``MAX_LINE``, is a ``UsageError`` naming it."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            if os.path.isdir(path):
                raise UsageError(f"{path}: is a folder; give the manifest file (OUT/{MANIFEST})")
            raise UsageError(f"{path}: not a regular file (a fifo or device?); give the manifest file")
        f = open(path, "rb")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such manifest") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        for number in itertools.count(1):
            raw = f.readline(MAX_LINE + 1)
            if not raw:
                return
            if len(raw) > MAX_LINE:
                raise UsageError(f"{path}:{number}: a line longer than {MAX_LINE:,} bytes; not a manifest")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UsageError(f"{path}:{number}: not UTF-8 text; not a manifest") from None
            if not text.strip() or text.startswith('{"' + PART_HEADER):
                continue
            yield parse_line(text, f"{path}:{number}")


def check_existing(out_dir: Path) -> None:
    """Refuse, before any work, an ``OUT/manifest.jsonl`` that a run could not update: not a
    regular file, or not a manifest (each line is read and checked)."""
    target = Path(out_dir) / MANIFEST
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return
    except OSError as e:
        raise UsageError(f"{target}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{target}: not a regular file (a link, folder or fifo); move it away to write the manifest")
    for _ in read_entries(target):
        pass


class Recorder:
    """The manifest lines of one process (share ``index`` of ``count``): written to a temporary
    file as results come; at ``finish`` sorted into this process's part, which is merged with the
    others' into ``manifest.jsonl`` once all are there."""

    def __init__(self, out_dir: Path, index: int = 0, count: int = 1, rank: int = 0, world: int = 1):
        self.out_dir, self.index, self.count, self.rank, self.world = Path(out_dir), index, count, rank, world
        self.part = self.out_dir / part_name(index, count, rank, world)
        self._atomic = None
        self._tmp: Path | None = None
        self._file = None

    def _open(self) -> None:
        self._atomic = atomic_path(self.part, overwrite=True)
        self._tmp = self._atomic.__enter__()
        self._file = open(self._tmp, "w", encoding="utf-8")

    def add(self, entry: Entry) -> None:
        if self._file is None:
            self._open()
        self._file.write(entry.line() + "\n")

    def finish(self, inputs: str | None = None) -> Merged:
        """Put this process's part in place (sorted) and merge the parts if all are there.

        ``inputs``, a digest of the whole list of inputs, lets the merge check that all parts
        split the same list.
        """
        if self._file is None:
            self._open()
        self._file.close()
        entries = sorted(read_entries(self._tmp), key=lambda e: e.key)
        header = {PART_HEADER: {"index": self.index, "count": self.count, "inputs": inputs}}
        if self.world > 1:
            header[PART_HEADER].update(rank=self.rank, world=self.world)
        with open(self._tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(header) + "\n")
            for entry in entries:
                f.write(entry.line() + "\n")
        with _locked(self.out_dir):
            self._atomic.__exit__(None, None, None)  # the part appears under its name
            if self.world > 1 and not _join_ranks(self.out_dir, self.index, self.count, self.world, inputs):
                return Merged(False, [self.index])
            return _merge(self.out_dir, self.count)


def _join_ranks(out_dir: Path, index: int, count: int, world: int, inputs: str | None) -> bool:
    """The ranks' parts of share ``index`` into that share's part, once all ``world`` are there."""
    ranks = [out_dir / part_name(index, count, r, world) for r in range(world)]
    if not all(p.exists() for p in ranks):
        return False
    header = {PART_HEADER: {"index": index, "count": count, "inputs": inputs}}
    with atomic_path(out_dir / part_name(index, count), overwrite=True) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(header) + "\n")
        for entry in heapq.merge(*(read_entries(p) for p in ranks), key=lambda e: e.key):
            f.write(entry.line() + "\n")
    for p in ranks:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return True


@dataclass
class Merged:
    """What a merge did."""

    merged: bool
    missing: list[int]  # the parts not there yet (the first ``SHOWN_MISSING`` of them)
    warning: str = ""  # parts that split different lists of inputs
    lines: int = 0


def merge(out_dir: Path, count: int) -> Merged:
    """Merge the ``count`` parts in ``out_dir`` into its ``manifest.jsonl`` if all are there."""
    with _locked(Path(out_dir)):
        return _merge(Path(out_dir), count)


SHOWN_MISSING = 16


def _merge(out_dir: Path, count: int) -> Merged:
    # parts are looked for in order and the search stops at the first missing ones: a count of
    # 10**20 costs as much as the parts that are really there
    missing: list[int] = []
    for i in range(count):
        if not (out_dir / part_name(i, count)).exists():
            missing.append(i)
            if len(missing) >= SHOWN_MISSING:
                break
    if missing:
        return Merged(False, missing)
    parts = [out_dir / part_name(i, count) for i in range(count)]
    warning = ""
    if len({_part_digest(p) for p in parts} - {None}) > 1:
        warning = (
            f"the {count} parts of the manifest were made from different lists of inputs (files added or changed "
            "between the jobs?): some inputs may be missing or done twice; check with --from-manifest"
        )
    target = out_dir / MANIFEST
    old = _sorted_entries(target) if target.exists() else iter(())
    new = heapq.merge(*(read_entries(p) for p in parts), key=lambda e: e.key)
    lines = 0
    with atomic_path(target, overwrite=True) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for entry in _update(old, new):
            f.write(entry.line() + "\n")
            lines += 1
    for p in parts:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return Merged(True, [], warning, lines)


def _update(old: Iterable[Entry], new: Iterable[Entry]) -> Iterator[Entry]:
    """Both sorted by key: per key, the new lines, or the old ones where the new only say "skipped"
    and the old say "done"."""
    tagged = heapq.merge(((e.key, 0, e) for e in old), ((e.key, 1, e) for e in new), key=lambda t: (t[0], t[1]))
    for _, group in itertools.groupby(tagged, key=lambda t: t[0]):
        olds, news = [], []
        for _, which, e in group:
            (news if which else olds).append(e)
        if not news:
            yield from olds
        elif all(e.status == SKIPPED for e in news) and any(e.status == DONE for e in olds):
            yield from olds
        else:
            kept = _extras(olds)  # the fields vqcli does not own (a caption, a label) stay
            for e in news:
                yield replace(e, extra=json.dumps({**kept, **json.loads(e.extra or "{}")}, ensure_ascii=False)) if kept else e


def _extras(entries: list[Entry]) -> dict:
    kept: dict = {}
    for e in entries:
        if e.extra:
            kept.update(json.loads(e.extra))
    return kept


def _sorted_entries(path: Path) -> Iterator[Entry]:
    """A manifest's entries in key order (one written by vqcli already is; others are sorted)."""
    previous = None
    for entry in read_entries(path):
        if previous is not None and entry.key < previous:
            return iter(sorted(read_entries(path), key=lambda e: e.key))
        previous = entry.key
    return read_entries(path)


def _part_digest(path: Path) -> str | None:
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    try:
        return json.loads(first)[PART_HEADER]["inputs"]
    except (ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    """An exclusive lock on the output folder's manifest (released if the process dies)."""
    try:
        import fcntl
    except ImportError:  # Windows: parts are merged without a lock
        yield
        return
    make_folders(out_dir)
    path = out_dir / LOCK
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags, 0o644)  # a link is not followed (ELOOP), a folder is refused (EISDIR)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EISDIR, errno.EMLINK):
            raise OSError(e.errno, f"{LOCK} is a link or a folder; move it away", str(path)) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{LOCK} is not a regular file (a fifo or device?); move it away", str(path))
        fcntl.lockf(fd, fcntl.LOCK_EX)  # POSIX record locks: the kind NFS supports
        try:
            yield
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
