"""Animated images (GIF, APNG, animated WebP, multi-page TIFF) read frame by frame.

Each frame is read as ``load_image`` reads a still image (``images.decoded``: EXIF orientation,
colour profile to sRGB, transparency over white) after Pillow has composited it: seeking to a
frame gives the whole canvas as a viewer shows it (a GIF's partial frames and disposal methods, an
APNG's blending applied), never the bare rectangle the file stores. The first frame is exactly
what ``load_image`` gives.

Frames are decoded in order, one at a time (each seek goes one frame forward), and only the
current one is held: a file of thousands of frames costs the memory of one. The frame count comes
from the file's header or a scan of its blocks, without decoding pixels, so that a limit can
refuse a file before any work.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vqcli.errors import FileError
from vqcli.io import images

DEFAULT_MAX_FRAMES = 1000


@dataclass(frozen=True)
class Frame:
    """One frame of an animated image: its place, its timing and (until it is encoded) its pixels."""

    index: int  # 0-based
    count: int  # the frames of the file
    duration_ms: int | None = None  # how long it is shown, where the format says (GIF, APNG, WebP)
    details: dict = field(default_factory=dict, compare=False)  # load_image's (icc_profile)
    rgb: np.ndarray | None = field(default=None, repr=False, compare=False)  # (H, W, 3) float32

    def describe(self) -> dict:
        """What a latent and a result record of the frame."""
        info = {"frame": self.index, "frames": self.count}
        if self.duration_ms is not None:
            info["frame_duration_ms"] = self.duration_ms
        return info


class AnimatedImage:
    """An image file (a path, or the bytes of an archive's member named ``path``) opened to be read
    frame by frame. ``count`` is its number of frames: 1 for a still image, and also for a file
    this cannot open (a HEIC, a damaged header: ``load_image`` reads it as a still image, or says
    in one line what is wrong). Use it as a context manager, or ``close`` it."""

    def __init__(self, source: Path | bytes, path: Path, *, max_pixels: int | None = images.DEFAULT_MAX_PIXELS):
        self.path = Path(path)
        self.max_pixels = max_pixels
        self.count = 1
        self._stack = contextlib.ExitStack()
        self._im = None
        data = io.BytesIO(source) if isinstance(source, bytes) else Path(source)
        try:
            self._im = self._stack.enter_context(images.opened(data, self.path, max_pixels))
            self.count = max(1, int(getattr(self._im, "n_frames", 1)))
        except Exception:  # noqa: BLE001 - read again as a still image, which says what is wrong
            self.close()
            self.count = 1

    def frames(self) -> Iterator[Frame]:
        """Each frame in order, decoded; a damaged one raises a ``FileError`` naming it (after the
        frames before it)."""
        im = self._im
        if im is None:
            raise FileError(self.path, "not open")
        for index in range(self.count):
            try:
                im.seek(index)
                details: dict = {}
                rgb = images.decoded(im, self.path, self.max_pixels, details)
            except FileError as e:
                raise FileError(self.path, f"frame {index} of {self.count}: {e.reason}") from None
            except Exception as e:
                if not images.is_decoding_error(e):
                    raise
                reason = images.decoding_error(self.path, e).reason
                raise FileError(self.path, f"frame {index} of {self.count}: {reason}") from None
            yield Frame(index, self.count, _duration(im.info.get("duration")), details, rgb)

    def close(self) -> None:
        self._im = None
        self._stack.close()

    def __enter__(self) -> AnimatedImage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _duration(value) -> int | None:
    """A frame's display time in milliseconds, as a whole number, when the format gives one."""
    try:
        ms = float(value)
    except (TypeError, ValueError):
        return None
    return int(round(ms)) if 0 <= ms < 1e9 else None
