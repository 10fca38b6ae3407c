"""Jobs (an input and the output it becomes) and their results. Nothing here imports torch, so the
CLI can name them before a command computes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from vqcli.errors import FileError, VqcliError
from vqcli.io.manifest import DONE, FAILED, SKIPPED  # noqa: F401 - the statuses a result and a manifest line share


@dataclass
class FileResult:
    """What happened to one input file."""

    input: Path
    output: Path | None
    status: str  # DONE, SKIPPED or FAILED
    reason: str = ""  # why it was skipped or failed
    fallback_fp32: bool = False  # reduced precision gave NaN/Inf; redone in float32
    info: dict[str, Any] = field(default_factory=dict)  # width, height, ...
    job: Job | None = field(default=None, repr=False, compare=False)  # the job it is the result of

    @property
    def message(self) -> str:
        """``path: reason``, as printed for failures."""
        return f"{self.input}: {self.reason}"


@dataclass(frozen=True)
class Job:
    """One input file and the output it becomes."""

    input: Path
    root: Path  # the folder it was found in (for a file named directly, the folder holding it)
    rel: PurePosixPath  # its path relative to ``root``
    output: Path
    size: int = -1  # bytes of the input (-1: not looked up)
    block: int = 0  # items of different blocks never share a batch (see ``number_blocks``)
    frame: Any = field(default=None, repr=False, compare=False)  # one frame of an animated image (io.frames.Frame; --all-frames)


@dataclass(frozen=True)
class TarJob(Job):
    """A tar shard of images (``input``): each image member becomes a ``MemberJob``, its output
    under the folder ``output``, or, with ``to_tar``, inside the tar ``output``."""

    members: frozenset[str] | None = None  # only these members (a re-run from a manifest); None: all
    to_tar: bool = False
    redo: bool = False  # to_tar: an output tar of vqcli's may be replaced (a re-run from a manifest)


@dataclass(frozen=True)
class MemberJob(Job):
    """One image inside a tar: ``input`` is ``tar/member`` (for messages), ``data`` its bytes."""

    tar: Path = Path()
    member: PurePosixPath = PurePosixPath()
    mtime: int = 0
    data: bytes = field(default=b"", repr=False, compare=False)


class StopRun(VqcliError):
    """A fault after which no later file can succeed either (the disk is full): ``result`` is the
    file it happened to. The pipeline raises it and stops; the files not reached are left to a re-run."""

    def __init__(self, result: FileResult):
        super().__init__(result.message)
        self.result = result


def _failed(path: Path, reason: str, output: Path | None = None) -> FileResult:
    return FileResult(Path(path), output, FAILED, reason)


def _from_error(job: Job, e: FileError) -> FileResult:
    # Name the input even when the error is about the output.
    reason = e.reason if Path(e.path) == job.input else f"{e.path}: {e.reason}"
    return FileResult(job.input, job.output, FAILED, reason, job=job)
