"""Pictures that explain themselves: the labelled side-by-side of a roundtrip, and the comparison
of several models' reconstructions of one image.

Layout of ``side_by_side`` (uint8 RGB)::

    original        reconstruction    error x4          <- a caption strip, CAPTION pixels high
    [image]   GAP   [image]     GAP   [image]
    PSNR 31.20 dB   SSIM 0.9123   dE00 2.31             <- a footer strip, CAPTION pixels high

Layout of ``comparison``: original | one reconstruction per model, each captioned with its
model's name, and below each reconstruction its own PSNR, SSIM and dE00 (a line each). No error
maps there: the panels stay the size of the image, so a comparison of four models is five
images wide, not nine.

Panels are separated by GAP columns of SEPARATOR grey; text is drawn with Pillow's default font
(no font file needed; it has no Greek, so the colour difference reads ``dE00`` here).
``panel_origin`` says where each panel starts, for whoever reads the picture.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vqcli.io.images import to_uint8
from vqcli.metrics import error_map

ERROR_GAIN = 4.0
CAPTION = 16  # pixels of the caption strip above the panels and of each footer line below them
GAP = 6  # pixels between two panels
SEPARATOR = (128, 128, 128)
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
LABELS = ("original", "reconstruction", f"error x{ERROR_GAIN:g}")


def panel_origin(index: int, width: int) -> tuple[int, int]:
    """(top, left) of panel ``index`` (0 original, then 1 reconstruction and 2 error, or the models
    of a comparison in order) of images ``width`` wide."""
    return CAPTION, index * (width + GAP)


def metric_lines(psnr: float, ssim: float, ciede2000: float) -> tuple[str, str, str]:
    return f"PSNR {psnr:.2f} dB", f"SSIM {ssim:.4f}", f"dE00 {ciede2000:.2f}"


def metrics_text(psnr: float, ssim: float, ciede2000: float) -> str:
    return "   ".join(metric_lines(psnr, ssim, ciede2000))


def side_by_side(
    original: np.ndarray, reconstruction: np.ndarray, psnr: float, ssim: float, ciede2000: float
) -> np.ndarray:
    """original | reconstruction | error amplified ERROR_GAIN times, labelled, with PSNR, SSIM and
    the mean CIEDE2000 below; uint8 (CAPTION + H + CAPTION, 3 W + 2 GAP, 3)."""
    errors = to_uint8(error_map(original / 255.0, reconstruction / 255.0, gain=ERROR_GAIN))
    canvas = _panels([original, reconstruction, errors], LABELS, footer_lines=1)
    canvas[CAPTION + original.shape[0] :] = _text_strip(metrics_text(psnr, ssim, ciede2000), canvas.shape[1])
    return canvas


def comparison(original: np.ndarray, reconstructions: Sequence[tuple[str, np.ndarray, dict]]) -> np.ndarray:
    """original | each ``(model name, reconstruction, metrics)`` in order, the metrics (``psnr``,
    ``ssim``, ``ciede2000``) under each reconstruction; uint8 (CAPTION + H + 3 CAPTION,
    (1 + models) W + models GAP, 3)."""
    height, width = original.shape[:2]
    labels = ["original", *(name for name, _, _ in reconstructions)]
    canvas = _panels([original, *(r for _, r, _ in reconstructions)], labels, footer_lines=3)
    for index, (_, _, m) in enumerate(reconstructions, start=1):
        _, left = panel_origin(index, width)
        for line, text in enumerate(metric_lines(m["psnr"], m["ssim"], m["ciede2000"])):
            top = CAPTION + height + line * CAPTION
            canvas[top : top + CAPTION, left : left + width] = _text_strip(text, width)
    return canvas


def _panels(panels: Sequence[np.ndarray], labels: Sequence[str], *, footer_lines: int) -> np.ndarray:
    """The panels side by side on BACKGROUND, separated, each captioned (text cut at the panel's
    edge), with ``footer_lines`` empty strips below for the caller to write in."""
    height, width = panels[0].shape[:2]
    canvas = np.empty((height + (1 + footer_lines) * CAPTION, len(panels) * (width + GAP) - GAP, 3), np.uint8)
    canvas[:] = BACKGROUND
    for index, panel in enumerate(panels):
        top, left = panel_origin(index, width)
        canvas[top : top + height, left : left + width] = panel
        if index:
            canvas[: top + height, left - GAP : left] = SEPARATOR
        canvas[:CAPTION, left : left + width] = _text_strip(labels[index], width)
    return canvas


def _text_strip(text: str, width: int) -> np.ndarray:
    """``text`` in Pillow's default font on a BACKGROUND strip CAPTION high and ``width`` wide."""
    strip = Image.new("RGB", (width, CAPTION), BACKGROUND)
    ImageDraw.Draw(strip).text((2, 2), text, fill=TEXT, font=ImageFont.load_default())
    return np.asarray(strip)
