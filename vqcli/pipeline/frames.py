"""``encode --all-frames``: an animated image becomes a job per frame.

``anim.gif`` gives ``anim.gif.frame0000.safetensors``, ``anim.gif.frame0001.safetensors``, ...
(the layout's name of ``anim.gif.frame0000``; four digits at least, more when the file has more
than 10,000 frames, so that a file's frames sort in order). A still image keeps its job, and so its
output, exactly as without ``--all-frames``.

Frames are decoded here, in order and one at a time, as the jobs are drawn (``io.frames``): an
animated file is opened once and each frame decoded once, and only the frames of the jobs in flight
are held. A file of more than ``max_frames`` frames fails before any frame is decoded. A frame that
cannot be decoded fails, naming the file and the frame; the frames before it keep their outputs
(they are right), the ones after it are not tried. Once every frame's job is out, ``leftover`` is
given the outputs of frames past the file's count (all of them for a still image) that an earlier
version of it left; with ``--overwrite`` the encoder removes those it wrote.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from vqcli.errors import FileError
from vqcli.io.frames import AnimatedImage
from vqcli.io.images import DEFAULT_MAX_PIXELS, is_image_path
from vqcli.pipeline.results import FAILED, FileResult, Job, MemberJob, TarJob

T = TypeVar("T")

_FRAME_NAME = re.compile(r"(.+)\.frame[0-9]{4,}")


def frame_name(name: str, index: int, count: int) -> str:
    """``anim.gif``, 3, 10 -> ``anim.gif.frame0003`` (zero-padded to the width of the last index, at least 4)."""
    width = max(4, len(str(count - 1)))
    return f"{name}.frame{index:0{width}d}"


def frame_jobs(
    jobs: Iterable[Job | FileResult],
    name: Callable[[str], str],
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_frames: int | None = None,
    leftover: Callable[[Path], None] | None = None,
) -> Iterator[Job | FileResult]:
    """Each job of an animated image as a job per frame (``Job.frame`` holding its pixels), named
    by ``name`` (the layout's) from ``frame_name``; the jobs of still images, and all else, as they are."""
    for job in jobs:
        if not isinstance(job, Job) or isinstance(job, TarJob):
            yield job
            continue
        m = _FRAME_NAME.fullmatch(job.rel.name)
        if m and is_image_path(m.group(1)):
            reason = (f"its output would take the name of a frame of {m.group(1)} under --all-frames; "
                      "rename it, or encode it without --all-frames")
            yield FileResult(job.input, job.output, FAILED, reason, job=job)
            continue
        yield from _frames_of(job, name, max_pixels, max_frames, leftover)


def _frames_of(job: Job, name, max_pixels: int | None, max_frames: int | None, leftover) -> Iterator[Job | FileResult]:
    source = job.data if isinstance(job, MemberJob) else job.input
    with AnimatedImage(source, job.input, max_pixels=max_pixels) as anim:
        count = anim.count
        folder = Path(job.output).parent
        if count == 1:
            anim.close()
            yield job
            _leftovers(job, folder, name, 0, leftover)
            return
        if max_frames and count > max_frames:
            reason = f"{count:,} frames, over the limit of --max-frames {max_frames:,}; raise it with --max-frames (0: no limit)"
            yield FileResult(job.input, job.output, FAILED, reason, job=job)
            return
        frames = anim.frames()
        for index in range(count):
            output = folder / name(frame_name(job.rel.name, index, count))
            try:
                frame = next(frames)
            except FileError as e:
                yield FileResult(job.input, output, FAILED, e.reason, job=replace(job, output=output))
                return
            yield replace(job, output=output, frame=frame)
    _leftovers(job, folder, name, count, leftover)


def _leftovers(job: Job, folder: Path, name, count: int, leftover) -> None:
    """``leftover`` of the outputs of frames ``count``, ``count + 1``, ... of ``job``'s image that
    an earlier version of it, of more frames, left (named as that version named them)."""
    if leftover is None:
        return
    index = count
    while os.path.lexists(path := folder / name(frame_name(job.rel.name, index, index + 1))):
        leftover(path)
        index += 1


def drop_pixels(item: T) -> T:
    """``item`` (a prepared image or a result) with a job that no longer holds its frame's pixels:
    once the image is a tensor they are not needed, and items and results outlive the reading."""
    job = item.job
    if job is not None and job.frame is not None and job.frame.rgb is not None:
        item.job = replace(job, frame=replace(job.frame, rgb=None))
    return item
