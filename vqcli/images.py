"""Image files in and out, for every image a user owns.

Reading always gives RGB as float32 in [0, 1], shape (H, W, 3), whatever the file holds:

- EXIF orientation is applied, so the image is upright as viewers show it;
- animated images (GIF, APNG, WebP, multi-page TIFF) give their first frame;
- transparency (RGBA, LA, palette with a transparent colour) is composited over white;
- greyscale is repeated over the three channels; CMYK, YCbCr, LAB and HSV are converted by Pillow;
- 16-bit images keep their precision (scaled by 1/65535), 32-bit float images are taken as [0, 1]
  and clipped, 32-bit integer images as 16-bit.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import FileError
from .fileio import atomic_path

IMAGE_EXTENSIONS = frozenset(
    ".png .jpg .jpeg .jpe .jfif .webp .bmp .dib .gif .tif .tiff .ppm .pgm .pbm .pnm .tga .ico .qoi".split()
)
OUTPUT_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


def is_image_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def load_image(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as RGB float32 in [0, 1], shape (H, W, 3), or raise ``FileError``.

    Images of more than ``max_pixels`` pixels are refused before their pixels are decoded
    (``None`` lifts the limit).
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            old_limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None  # we check the size ourselves, before decoding
            try:
                with Image.open(path) as im:
                    width, height = im.size
                    if width < 1 or height < 1:
                        raise FileError(path, f"image has no pixels ({width}x{height})")
                    if max_pixels is not None and width * height > max_pixels:
                        raise FileError(
                            path,
                            f"image is {width}x{height} = {width * height:,} pixels, over the limit of "
                            f"{max_pixels:,} (a decompression bomb?); raise it with --max-pixels",
                        )
                    im.seek(0)
                    im.load()
                    return _to_rgb_float(ImageOps.exif_transpose(im))
            finally:
                Image.MAX_IMAGE_PIXELS = old_limit
    except FileError:
        raise
    except IsADirectoryError:
        raise FileError(path, "is a folder, not an image") from None
    except FileNotFoundError:
        raise FileError(path, "no such file") from None
    except PermissionError:
        raise FileError(path, "permission denied") from None
    except UnidentifiedImageError:
        raise FileError(path, "not an image (or a format Pillow cannot read)") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, Image.DecompressionBombError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileError(path, f"cannot decode image ({reason})") from None


def _to_rgb_float(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        grey = np.asarray(im, dtype=np.float64) / 65535.0
        return _grey_to_rgb(np.clip(grey, 0.0, 1.0))
    if mode == "F":
        grey = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        return _grey_to_rgb(np.clip(grey, 0.0, 1.0))
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB") and "transparency" in im.info)
    if has_alpha:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
        alpha = rgba[..., 3:4]
        return np.ascontiguousarray(rgba[..., :3] * alpha + (1.0 - alpha), dtype=np.float32)
    if mode in ("L", "1"):
        return _grey_to_rgb(np.asarray(im.convert("L"), dtype=np.float32) / 255.0)
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey.astype(np.float32)[..., None], 3, axis=2)


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    """[0, 1] float (H, W, 3) to uint8, rounding to nearest."""
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def save_image(
    rgb: np.ndarray,
    path: str | os.PathLike,
    *,
    fmt: str = "png",
    quality: int = 95,
    overwrite: bool = False,
) -> None:
    """Write a [0, 1] float or uint8 (H, W, 3) image atomically."""
    pil_format = OUTPUT_FORMATS[fmt]
    pixels = rgb if rgb.dtype == np.uint8 else to_uint8(rgb)
    image = Image.fromarray(pixels, mode="RGB") if pixels.ndim == 3 else Image.fromarray(pixels)
    options = {"quality": quality} if pil_format in ("JPEG", "WEBP") else {}
    with atomic_path(path, overwrite=overwrite) as tmp:
        image.save(tmp, format=pil_format, **options)
