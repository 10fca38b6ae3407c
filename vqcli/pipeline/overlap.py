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


class WriteBehind:
    """Runs write jobs (functions returning a result) on one thread, in order, at most ``depth``
    queued; ``submit`` gives the results that are ready, ``drain`` all the others.

    One thread, so writes happen in the order they were submitted (a tar being filled member by
    member stays in order). Closing (``with`` exit, or the owning generator closed by an error or
    Ctrl-C) waits for the writes already submitted: each file is then complete, under its final
    name, or absent.

    Every result is given exactly once, wherever a Ctrl-C falls: a job stays in ``pending`` until
    its result has been given, and is marked given (``_given``) in the same step as it is yielded
    (no signal handler can run between the two), so that ``drain`` after an interrupt gives the
    results not given and only those. (Taking a job off the queue before giving its result lost
    that result, its file on disk but missing from the summary, when Ctrl-C fell in between.)

    A job that raises stops the writer: the jobs queued behind it are not run (they raise
    ``cf.CancelledError``). The exception stops the run when it reaches the caller, so their results
    would never be reported; run anyway, they would leave files the summary does not count (or, on
    a full disk, fail the same way).
    """

    def __init__(self, depth: int = WRITE_DEPTH, *, enabled: bool = True):
        self.depth = depth
        self.pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vqcli-write") if enabled else None
        self.pending: collections.deque[cf.Future] = collections.deque()  # submitted, result not given, oldest first
        self._given: cf.Future | None = None  # the oldest job's, when its result was given (taken off next)
        self.broken = False  # a job raised: the ones behind it are not run (set and read on the writer thread)

    def submit(self, job: Callable[[], R]) -> Iterator[R]:
        """Queue ``job`` and give the results that are ready, oldest first, waiting for the oldest
        while more than ``depth`` are queued. When the caller stops taking (Ctrl-C between two),
        ``drain`` gives the rest."""
        if self.pool is None:
            future: cf.Future = cf.Future()
            future.set_result(job())
        else:
            future = self.pool.submit(self._run, job)
        self.pending.append(future)
        return self._give(lambda: len(self.pending) > self.depth or self.pending[0].done())

    def drain(self) -> Iterator[R]:
        """Wait for every queued job; give all the results not given yet, in order."""
        return self._give(lambda: True)

    def _run(self, job: Callable[[], R]) -> R:
        if self.broken:
            raise cf.CancelledError("an earlier write failed")
        try:
            return job()
        except BaseException:
            self.broken = True
            raise

    def _give(self, take: Callable[[], bool]) -> Iterator[R]:
        """The results of the oldest jobs, in order, while ``take()`` says so, each waited for; a
        job's exception is raised at its turn, after the results of the jobs before it (whose files
        are written: they must be counted), however the writer thread and the caller interleave."""
        while True:
            if self.pending and self.pending[0] is self._given:
                self.pending.popleft()
            if not self.pending or not take():
                return
            future = self.pending[0]
            cf.wait([future])  # (a Ctrl-C here leaves the job queued, for drain)
            error = future.exception()
            if error is not None:
                self._given = future
                raise error
            result = future.result()
            self._given = future  # (and nothing between this and the yield: see the class)
            yield result

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
