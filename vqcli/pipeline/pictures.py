"""Pictures that explain themselves: the labelled side-by-side of a roundtrip.

Layout (uint8 RGB)::

    original        reconstruction    error x4          <- a caption strip, CAPTION pixels high
    [image]   GAP   [image]     GAP   [image]
    PSNR 31.20 dB   SSIM 0.9123                         <- a footer strip, CAPTION pixels high

Panels are separated by GAP columns of SEPARATOR grey; text is drawn with Pillow's default font
(no font file needed). ``panel_origin`` says where each panel starts, for whoever reads the picture.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vqcli.io.images import to_uint8
from vqcli.metrics import error_map

ERROR_GAIN = 4.0
CAPTION = 16  # pixels of the caption strip above the panels and of the footer below them
GAP = 6  # pixels between two panels
SEPARATOR = (128, 128, 128)
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
LABELS = ("original", "reconstruction", f"error x{ERROR_GAIN:g}")


def panel_origin(index: int, width: int) -> tuple[int, int]:
    """(top, left) of panel ``index`` (0 original, 1 reconstruction, 2 error) of images ``width`` wide."""
    return CAPTION, index * (width + GAP)


def metrics_text(psnr: float, ssim: float) -> str:
    return f"PSNR {psnr:.2f} dB   SSIM {ssim:.4f}"


def side_by_side(original: np.ndarray, reconstruction: np.ndarray, psnr: float, ssim: float) -> np.ndarray:
    """original | reconstruction | error amplified ERROR_GAIN times, labelled, with PSNR and SSIM
    below; uint8 (CAPTION + H + CAPTION, 3 W + 2 GAP, 3)."""
    height, width = original.shape[:2]
    errors = to_uint8(error_map(original / 255.0, reconstruction / 255.0, gain=ERROR_GAIN))
    canvas = np.empty((height + 2 * CAPTION, 3 * width + 2 * GAP, 3), np.uint8)
    canvas[:] = BACKGROUND
    for index, panel in enumerate((original, reconstruction, errors)):
        top, left = panel_origin(index, width)
        canvas[top : top + height, left : left + width] = panel
        if index:
            canvas[: top + height, left - GAP : left] = SEPARATOR
        canvas[:CAPTION, left : left + width] = _text_strip(LABELS[index], width)  # (cut at the panel's edge)
    canvas[CAPTION + height :] = _text_strip(metrics_text(psnr, ssim), canvas.shape[1])
    return canvas


def _text_strip(text: str, width: int) -> np.ndarray:
    """``text`` in Pillow's default font on a BACKGROUND strip CAPTION high and ``width`` wide."""
    strip = Image.new("RGB", (width, CAPTION), BACKGROUND)
    ImageDraw.Draw(strip).text((2, 2), text, fill=TEXT, font=ImageFont.load_default())
    return np.asarray(strip)
