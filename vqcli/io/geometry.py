"""Bringing an image to a training size: resize to cover, then crop; aspect-ratio buckets.

``Fit`` says what a run asks for (``--resolution N``: N x N; ``--size WxH``; ``--buckets N``: the
bucket of about N*N pixels whose aspect ratio is nearest the image's); ``place`` decides, for one
image, the size it is resized to (the smallest that covers the target, aspect ratio kept) and the
crop (centred, or at a position drawn from a seed); ``apply`` does both, resizing once with
Pillow's LANCZOS filter (antialiased) on float channels, so no 8-bit rounding is added.

Sizes follow diffusers' SDXL conventions: ``(height, width)`` and ``crop_top_left = (top, left)``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

MAX_RATIO = 4.0  # buckets span aspect ratios from 1:4 to 4:1


@dataclass(frozen=True)
class Fit:
    """The target of a run: ``mode`` "resolution", "size" or "buckets"."""

    mode: str
    width: int  # resolution and buckets: N; size: W
    height: int  # resolution and buckets: N; size: H
    crop: str = "center"  # or "random"
    step: int = 8  # buckets: sides are multiples of this (the model's factor times 8)

    def __post_init__(self):
        if self.mode not in ("resolution", "size", "buckets"):
            raise ValueError(f"unknown fit mode {self.mode!r}")
        if self.crop not in ("center", "random"):
            raise ValueError(f"--crop must be center or random, not {self.crop!r}")
        if self.width < 1 or self.height < 1:
            raise ValueError("sizes must be positive")

    def describe(self) -> str:
        """One line naming the fit (recorded with the latents, compared on resume)."""
        if self.mode == "size":
            what = f"size={self.width}x{self.height}"
        elif self.mode == "resolution":
            what = f"resolution={self.width}"
        else:
            what = f"buckets={self.width},step={self.step}"
        return f"{what},crop={self.crop}"

    def buckets(self) -> list[tuple[int, int]]:
        """``(width, height)`` of the buckets (``mode == "buckets"``), narrowest first."""
        return make_buckets(self.width, self.step)


def parse_size(text: str) -> tuple[int, int]:
    """``"WxH"`` to ``(W, H)`` (``ValueError`` with the reason otherwise)."""
    m = re.fullmatch(r"\s*([0-9]{1,6})\s*[xX]\s*([0-9]{1,6})\s*", text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(f"{text!r} is not a size WIDTHxHEIGHT such as 768x512")
    return int(m.group(1)), int(m.group(2))


def make_buckets(side: int, step: int) -> list[tuple[int, int]]:
    """Buckets of at most ``side * side`` pixels, sides multiples of ``step``, aspect ratios up to
    ``MAX_RATIO``: for each width up to ``side``, the tallest height that keeps the area, and the
    same turned a quarter (as SDXL trainers make them)."""
    area = side * side
    found = set()
    for width in range(step, max(side, step) + 1, step):  # portrait and square; landscape mirrors them
        height = (area // width) // step * step
        if height >= width and height / width <= MAX_RATIO:
            found.update({(width, height), (height, width)})
    return sorted(found)


def choose_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (in log ratio; the larger on a tie)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


@dataclass(frozen=True)
class Placement:
    """Where one image goes: all sizes ``(height, width)``."""

    original_size: tuple[int, int]
    resized: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]

    @property
    def crop_ltrb(self) -> tuple[int, int, int, int]:
        """The crop as kohya records it: left, top, right, bottom in the resized image."""
        top, left = self.crop_top_left
        return left, top, left + self.target_size[1], top + self.target_size[0]


def place(width: int, height: int, fit: Fit, seed: int = 0) -> Placement:
    """Where a ``width`` x ``height`` image goes under ``fit`` (``seed``: of a random crop)."""
    if fit.mode == "buckets":
        tw, th = choose_bucket(width, height, fit.buckets())
    else:
        tw, th = fit.width, fit.height
    scale = max(tw / width, th / height)
    rw, rh = max(tw, round(width * scale)), max(th, round(height * scale))
    if fit.crop == "random":
        rng = np.random.default_rng(seed)
        top, left = int(rng.integers(0, rh - th + 1)), int(rng.integers(0, rw - tw + 1))
    else:
        top, left = (rh - th) // 2, (rw - tw) // 2
    return Placement((height, width), (rh, rw), (top, left), (th, tw))


def apply(rgb: np.ndarray, placement: Placement) -> np.ndarray:
    """Resize an (H, W, 3) float [0, 1] image once (LANCZOS), then crop, as ``placement`` says."""
    rh, rw = placement.resized
    if (rh, rw) != tuple(rgb.shape[:2]):
        channels = [
            np.asarray(Image.fromarray(np.ascontiguousarray(rgb[..., c], dtype=np.float32), "F").resize((rw, rh), Image.LANCZOS))
            for c in range(rgb.shape[2])
        ]
        rgb = np.clip(np.stack(channels, axis=2), 0.0, 1.0)
    top, left = placement.crop_top_left
    th, tw = placement.target_size
    return np.ascontiguousarray(rgb[top : top + th, left : left + tw], dtype=np.float32)
