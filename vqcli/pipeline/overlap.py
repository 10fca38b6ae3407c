"""Overlapping file work with the model: loading ahead and writing behind, in worker threads.

Decoding a PNG or JPEG, compressing a PNG and writing a file mostly run in C code that releases the
GIL (zlib, libjpeg, the file system), so threads overlap them with the model's computation. Both
helpers keep the order of their inputs, so a run's results (and batches) are the same as without
them, and both hold only a bounded number of items, so memory stays flat over any number of files.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], *, workers: int, ahead: int) -> Iterator[R]:
    """``map(fn, items)`` with up to ``ahead`` calls running or finished ahead of the consumer, on
    ``workers`` threads; results in the order of ``items``. ``workers=0``: plain ``map``.

    An exception raised by ``fn`` is raised here, at its item's turn. When the consumer stops early
    (an error, Ctrl-C), calls not yet started are cancelled and running ones finish on their own.
    """
    if workers <= 0:
        yield from map(fn, items)
        return
    pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vqcli-load")
    pending: collections.deque[cf.Future] = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            while len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


WRITE_DEPTH = 2  # writes queued behind the model before it waits for the oldest


class _Raised:
    """A write job's exception, kept in ``WriteBehind.ready`` in its job's place."""

    def __init__(self, error: BaseException):
        self.error = error


class WriteBehind:
    """Runs write jobs (functions returning a result) on one thread, in order, at most ``depth``
    queued; ``submit`` gives the results that are ready, ``drain`` all the others.

    One thread, so writes happen in the order they were submitted (a tar being filled member by
    member stays in order). Closing (``with`` exit, or the owning generator closed by an error or
    Ctrl-C) waits for the writes already submitted: each file is then complete, under its final
    name, or absent.

    A job that raises stops the writer: the jobs queued behind it are not run (they raise
    ``cf.CancelledError``). The exception stops the run when it reaches the caller, so their results
    would never be reported; run anyway, they would leave files the summary does not count (or, on
    a full disk, fail the same way).
    """

    def __init__(self, depth: int = WRITE_DEPTH, *, enabled: bool = True):
        self.depth = depth
        self.pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vqcli-write") if enabled else None
        self.pending: collections.deque[cf.Future] = collections.deque()
        self.ready: collections.deque[R] = collections.deque()  # results done, not given yet
        self.broken = False  # a job raised: the ones behind it are not run (set and read on the writer thread)

    def submit(self, job: Callable[[], R]) -> Iterator[R]:
        """Queue ``job`` (waiting while ``depth`` are queued) and give the results that are ready,
        oldest first. Each is taken from the writer as it is given: when the caller stops taking
        (Ctrl-C between two), ``drain`` gives the rest."""
        if self.pool is None:
            self.ready.append(job())
        else:
            self.pending.append(self.pool.submit(self._run, job))
            while self.pending and (len(self.pending) > self.depth or self.pending[0].done()):
                if not self._take_oldest():
                    break
        return self._give()

    def _run(self, job: Callable[[], R]) -> R:
        if self.broken:
            raise cf.CancelledError("an earlier write failed")
        try:
            return job()
        except BaseException:
            self.broken = True
            raise

    def drain(self) -> Iterator[R]:
        """Wait for every queued job; give all the results not given yet, in order."""
        while self.pending and self._take_oldest():
            pass
        return self._give()

    def _take_oldest(self) -> bool:
        """Wait for the oldest job, then move its result (or its exception) to ``ready``; False when
        it raised. The wait comes first, with the job still in ``pending``: a Ctrl-C during it leaves
        the job there for ``drain``, where taking it off first lost its result while its file was
        written (the summary then missed a file)."""
        cf.wait([self.pending[0]])
        future = self.pending.popleft()
        error = future.exception()
        self.ready.append(_Raised(error) if error is not None else future.result())
        return error is None

    def _give(self) -> Iterator[R]:
        """The results in ``ready``, oldest first; a job's exception is raised at its turn, after
        the results of the jobs before it (whose files are written: they must be counted), however
        the writer thread and the caller happened to interleave."""
        while self.ready:
            result = self.ready.popleft()
            if isinstance(result, _Raised):
                self.ready.clear()
                raise result.error
            yield result

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def __enter__(self) -> "WriteBehind":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
