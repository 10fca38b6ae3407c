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

Writing: every process (torchrun rank, ``--shard`` job) writes its lines to a temporary file while
it runs and, at the end, sorts them into ``manifest-part-I-of-N.jsonl`` (atomically). Parts are
merged into ``manifest.jsonl`` (under a lock, then removed) as soon as all N exist: by rank 0 after
the other ranks are done, or by whichever ``--shard`` job finishes last. A shard that never
finished leaves the parts in place; rerunning it (it resumes) completes the merge.

Reading (``read_entries``) accepts lines with only ``source`` too (a list of inputs made by
another tool: ``rel`` is then the file name, and the status unknown).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import UsageError
from .fileio import TMP_PREFIX, atomic_path

MANIFEST = "manifest.jsonl"
LOCK = ".manifest.lock"
PART_HEADER = "vqcli_manifest_part"
DONE, SKIPPED, FAILED = "done", "skipped", "failed"
_PART = re.compile(r"manifest-part-(\d+)-of-(\d+)\.jsonl")


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

    @property
    def key(self) -> tuple[str, str]:
        return self.source, self.member or ""

    def line(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


def part_name(index: int, count: int) -> str:
    return f"manifest-part-{index}-of-{count}.jsonl"


def parse_line(text: str, where: str) -> Entry:
    """One line to an ``Entry``, or a ``UsageError`` naming ``where`` (``file:line``)."""
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise UsageError(f"{where}: not JSON ({e})") from None
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
    return Entry(obj["source"], member, rel, text_or_none("output"), size, status, text_or_none("error"))


def read_entries(path: Path) -> Iterator[Entry]:
    """The lines of a manifest (blank lines and part headers are passed over)."""
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such manifest") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a folder; give the manifest file (OUT/{MANIFEST})") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        for number, text in enumerate(f, 1):
            if not text.strip() or text.startswith('{"' + PART_HEADER):
                continue
            yield parse_line(text, f"{path}:{number}")


# --- writing --------------------------------------------------------------------------------------


class Recorder:
    """The manifest lines of one process: appended to a temporary file as results come, sorted into
    this process's part at ``finish``."""

    def __init__(self, out_dir: Path, index: int = 0, count: int = 1):
        self.out_dir, self.index, self.count = Path(out_dir), index, count
        self._file = None
        self._tmp: Path | None = None

    def add(self, entry: Entry) -> None:
        if self._file is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=TMP_PREFIX + "manifest-", suffix=".jsonl", dir=self.out_dir)
            self._file, self._tmp = os.fdopen(fd, "w", encoding="utf-8"), Path(name)
        self._file.write(entry.line() + "\n")

    def finish(self, inputs: str | None = None) -> Path:
        """Write this process's part (sorted, atomically) and return its path. ``inputs`` (a digest
        of the whole input list) lets the merge check that all parts split the same list."""
        entries: list[Entry] = []
        if self._file is not None:
            self._file.close()
            entries = list(read_entries(self._tmp))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        part = self.out_dir / part_name(self.index, self.count)
        header = {PART_HEADER: {"index": self.index, "count": self.count, "inputs": inputs}}
        with atomic_path(part, overwrite=True) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(header) + "\n")
            for entry in sorted(entries, key=lambda e: e.key):
                f.write(entry.line() + "\n")
        if self._tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                self._tmp.unlink()
        return part


@dataclass
class Merged:
    """What ``merge`` did."""

    merged: bool
    missing: list[int]  # parts not there yet
    warning: str = ""  # parts that split different input lists
    lines: int = 0


def merge(out_dir: Path, count: int) -> Merged:
    """Merge the ``count`` parts in ``out_dir`` into its ``manifest.jsonl`` when all are there."""
    out_dir = Path(out_dir)
    with _locked(out_dir):
        parts = [out_dir / part_name(i, count) for i in range(count)]
        missing = [i for i, p in enumerate(parts) if not p.exists()]
        if missing:
            return Merged(False, missing)
        digests = {_part_digest(p) for p in parts} - {None}
        warning = ""
        if len(digests) > 1:
            warning = (
                f"the {count} parts of the manifest were made from different lists of inputs (files added or "
                "changed between the jobs?): some inputs may be missing or done twice; check with --from-manifest"
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
            yield from news


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
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / LOCK, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def pending_parts(out_dir: Path) -> dict[int, list[int]]:
    """Parts waiting in ``out_dir``: {count: [indices present]}."""
    found: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for name in os.listdir(out_dir):
            m = _PART.fullmatch(name)
            if m:
                found.setdefault(int(m.group(2)), []).append(int(m.group(1)))
    return {count: sorted(indices) for count, indices in found.items()}
