"""Image files in and out, for every image a user owns.

Reading always gives RGB as float32 in [0, 1], shape (H, W, 3), whatever the file holds:

- EXIF orientation is applied, so the image is upright as viewers show it;
- animated images (GIF, APNG, WebP, multi-page TIFF) give their first frame (``details["frames"]``
  says how many there were; ``vqcli.io.frames`` reads them all, one at a time);
- an embedded ICC colour profile other than sRGB is converted to sRGB by Pillow's ``ImageCms``
  (relative colorimetric); ``details["icc_profile"]`` names the source profile;
- AVIF is read where this Pillow reads it; HEIC/HEIF where ``pillow-heif`` is installed (the extra
  ``vqcli[heif]``), otherwise refused with a line saying how to add it;
- transparency (RGBA, LA, palette with a transparent colour) is composited over white;
- greyscale is repeated over the three channels; CMYK, YCbCr, LAB and HSV are converted by Pillow;
- 16-bit greyscale images keep their precision (scaled by 1/65535); 16-bit colour images are
  reduced to 8 bits per channel by Pillow (the models see 8-bit images in training anyway);
  32-bit float images are taken as [0, 1] and clipped, 32-bit integer images as 16-bit.

A file's format is found from its content, never from its name: a PNG named ``.jpg`` is read as
the PNG it is. Only the formats listed in ``READ_FORMATS`` are tried (those of
``IMAGE_EXTENSIONS``), whatever else Pillow could open: a file of another format (EPS, which
Pillow hands to Ghostscript; PSD, PCX...) is refused, its format named ("an image in the PCX
format, which vqcli does not read"), whatever its name. The extension only decides which files a folder walk takes.

Hostile files: images of more than ``max_pixels`` pixels (Pillow's decompression-bomb limit by
default, ``--max-pixels`` on the command line) are refused from their header, before any pixel is
decoded, with the size in the message; truncated or corrupt files of any format (the errors
``is_decoding_error`` accepts) are a ``FileError`` naming the file. Pillow's
warnings about damaged files (corrupt EXIF, say) are not shown.

Writing marks each image as vqcli's (EXIF ``Software`` tag), so that a later run can tell the
images it decoded, which it may replace, from anyone else's, which it never replaces.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import struct
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError, features

from vqcli.errors import FileError, first_line
from vqcli.io.atomic import atomic_path

IMAGE_EXTENSIONS = frozenset(
    ".png .jpg .jpeg .jpe .jfif .webp .bmp .dib .gif .tif .tiff .ppm .pgm .pbm .pnm .tga .ico .qoi .avif .heic .heif"
    .split()
)
HEIF_HINT = "a HEIC/HEIF image; reading it needs pillow-heif: pip install 'vqcli[heif]'"


OUTPUT_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


# The file-name extensions each output format is known by.
FORMAT_EXTENSIONS = {"png": (".png",), "jpg": (".jpg", ".jpeg", ".jpe", ".jfif"), "webp": (".webp",)}
SOFTWARE_TAG = 0x0131  # EXIF "Software"
SOFTWARE = "vqcli"
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


# The Pillow formats of IMAGE_EXTENSIONS, the only ones tried when a file is opened ("JPEG" covers
# the multi-picture JPEGs (MPO) cameras write; "PPM" the .pgm, .pbm and .pnm variants).
READ_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "DIB", "GIF", "TIFF", "PPM", "TGA", "ICO", "QOI") + (
    ("AVIF",) if features.check("avif") else ()
)
# ISO base media file brands (bytes 8-12, after "ftyp") of HEIC/HEIF images, and of AVIF ones.
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}


# What Pillow's plugins and decoders raise on damaged data (besides OSError, their usual one): each
# is that file's FileError. Types that would rather mean a bug in vqcli (TypeError, AttributeError,
# KeyError) are that file's FileError only where Pillow's own code raised them (a TIFF page without
# its dimensions: TypeError), so that a bug of ours is not dressed up as a damaged file.
_DECODER_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, MemoryError, struct.error, zlib.error, IndexError,
    ZeroDivisionError, OverflowError,
)
_PILLOW_ONLY_ERRORS = (TypeError, AttributeError, KeyError)
_PILLOW_DIR = Path(Image.__file__).resolve().parent


def is_image_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def load_image(
    path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, details: dict | None = None
) -> np.ndarray:
    """Read an image file as RGB float32 in [0, 1], shape (H, W, 3), or raise ``FileError``.

    Images of more than ``max_pixels`` pixels are refused from their header, before their pixels
    are decoded (``None`` lifts the limit). Safe to call from several threads at once.
    ``details``, when given, receives ``frames`` (an animated image's frame count, of which the
    first was read) and ``icc_profile`` (the name of the colour profile converted to sRGB).
    """
    path = Path(path)
    _refuse_special(path)
    return _load(path, path, max_pixels, details)


def _refuse_special(path: Path) -> None:
    """A pipe, socket or device named like an image would block the read, or never end: refused."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # the open that follows says what is wrong
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise FileError(path, "not a regular file (a pipe, socket or device); not read")


def load_image_bytes(
    data: bytes, path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, details: dict | None = None
) -> np.ndarray:
    """An image held in memory (an archive's member, say), read exactly as ``load_image`` reads a
    file, with the same checks; errors name ``path``."""
    return _load(io.BytesIO(data), Path(path), max_pixels, details)


BYTES_PER_PIXEL_BOUND = 8  # the most an image file stores per pixel (16-bit RGBA, uncompressed)
FILE_OVERHEAD_BOUND = 16 * 1024 * 1024  # metadata, ICC profiles, thumbnails: what a file may add


def member_too_large(size: int, head: bytes, max_pixels: int) -> str:
    """Why an image held in an archive, ``size`` bytes starting with ``head``, must not be read
    whole under ``max_pixels``, or ``""``: its size is over what an image of ``max_pixels`` (or of
    the size its header states, when the head holds the header) can take up, or its header states
    more pixels than that. Checked before the member's bytes are read."""
    bound = BYTES_PER_PIXEL_BOUND * max_pixels + FILE_OVERHEAD_BOUND
    if size > bound:
        return f"{size:,} bytes, more than an image of --max-pixels {max_pixels:,} can hold ({bound:,}); not read"
    if not head:
        return ""  # empty: refused as such when it loads
    try:
        with _pillow_warnings_off(), _open_unchecked(io.BytesIO(head)) as im:
            width, height = im.size
    except Exception:  # the head alone may not hold the header (a long EXIF first): read it whole, bounded
        return ""
    if width * height > max_pixels:
        return _too_large(width, height, max_pixels)
    own = BYTES_PER_PIXEL_BOUND * width * height + FILE_OVERHEAD_BOUND
    if size > own:
        return f"{size:,} bytes for a {width}x{height} image (at most {own:,} expected); not read"
    return ""


def _load(source: Path | io.BytesIO, path: Path, max_pixels: int | None, details: dict | None = None) -> np.ndarray:
    _allow_pillow(max_pixels)
    details = {} if details is None else details
    try:
        with _pillow_warnings_off():
            if _brand(source) in _HEIF_BRANDS:
                return _load_heif(source, path, max_pixels, details)
            with _open_unchecked(source) as im:
                _check_size(path, im.size, max_pixels)
                frames = getattr(im, "n_frames", 1)
                if frames > 1:
                    details["frames"] = frames
                im.seek(0)
                # a container (an ICO's embedded PNG) may hold a larger image than its header said
                return decoded(im, path, max_pixels, details)
    except FileError:
        raise
    except IsADirectoryError:
        raise FileError(path, "is a folder, not an image") from None
    except FileNotFoundError:
        raise FileError(path, "no such file") from None
    except PermissionError:
        raise FileError(path, "permission denied") from None
    except UnidentifiedImageError:
        if _is_empty(source):
            raise FileError(path, "empty file (0 bytes), not an image") from None
        if _brand(source) in _AVIF_BRANDS:
            if "AVIF" in READ_FORMATS:  # this Pillow reads AVIF: the file is what is broken
                raise FileError(path, "cannot decode image (an AVIF file, truncated or damaged)") from None
            raise FileError(path, "an AVIF image, which this Pillow cannot read (pip install -U pillow)") from None
        other = _other_format(source)
        if other is not None:
            raise FileError(
                path, f"an image in the {other} format, which vqcli does not read (it reads {', '.join(READ_FORMATS)})"
            ) from None
        raise FileError(path, "not an image (or a format Pillow cannot read)") from None
    except Exception as e:
        if not is_decoding_error(e):
            raise
        raise decoding_error(path, e) from None


_DECODING_ERRORS = (Image.DecompressionBombError, *_DECODER_ERRORS)  # what a decoder raises on a damaged file


def is_decoding_error(e: BaseException) -> bool:
    """Whether ``e``, raised while an image was opened or decoded, says the file is damaged: one of
    ``_DECODING_ERRORS``, or one of ``_PILLOW_ONLY_ERRORS`` raised inside Pillow itself."""
    if isinstance(e, _DECODING_ERRORS):
        return True
    if not isinstance(e, _PILLOW_ONLY_ERRORS) or e.__traceback__ is None:
        return False
    tb = e.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PILLOW_DIR)


def decoding_error(path: Path, e: BaseException) -> FileError:
    """The one-line ``FileError`` of an error ``is_decoding_error`` accepts, raised while decoding ``path``."""
    if isinstance(e, Image.DecompressionBombError):
        return FileError(path, f"{first_line(e)}; raise the limit with --max-pixels")
    return FileError(path, f"cannot decode image ({first_line(e)[:200]})")


@contextlib.contextmanager
def opened(source: Path | io.BytesIO, path: Path, max_pixels: int | None):
    """An image file (or bytes) opened, its header only parsed, under ``load_image``'s checks: not
    a pipe or device, one of ``READ_FORMATS``, not over ``max_pixels``, Pillow's warnings off
    while it is open. Errors as Pillow raises them (``load_image`` says them in one line)."""
    if isinstance(source, Path):
        _refuse_special(source)
    _allow_pillow(max_pixels)
    with _pillow_warnings_off(), _open_unchecked(source) as im:
        _check_size(path, im.size, max_pixels)
        yield im


def decoded(im: Image.Image, path: Path, max_pixels: int | None, details: dict | None = None) -> np.ndarray:
    """The frame ``im`` is at (after ``seek``), decoded and read as ``load_image`` reads an image
    (``pil_to_rgb``), its size checked again (a container may hold more than its header said)."""
    im.load()
    _check_size(path, im.size, max_pixels)
    return pil_to_rgb(im, details)


def _brand(source: Path | io.BytesIO) -> bytes | None:
    """The major brand of an ISO base media file (HEIC, AVIF), from its first 12 bytes, if it is one."""
    try:
        if isinstance(source, io.BytesIO):
            head = source.getbuffer()[:12].tobytes()
        else:
            with open(source, "rb") as f:
                head = f.read(12)
    except OSError:
        return None  # (the open that follows says what is wrong)
    return head[8:12] if len(head) == 12 and head[4:8] == b"ftyp" else None


def _load_heif(source: Path | io.BytesIO, path: Path, max_pixels: int | None, details: dict) -> np.ndarray:
    """A HEIC/HEIF image through pillow-heif (without registering it in Pillow: no process-wide change)."""
    try:
        import pillow_heif
    except ImportError:
        raise FileError(path, HEIF_HINT) from None
    if isinstance(source, io.BytesIO):
        source.seek(0)
    heif = pillow_heif.open_heif(source, convert_hdr_to_8bit=True)
    _check_size(path, heif.size, max_pixels)
    if len(heif) > 1:
        details["frames"] = len(heif)
    im = heif.to_pillow()
    _check_size(path, im.size, max_pixels)
    return pil_to_rgb(im, details)


def _other_format(source: Path | io.BytesIO) -> str | None:
    """The format Pillow finds in a file vqcli does not read (its header only is parsed), if any."""
    try:
        if isinstance(source, io.BytesIO):
            source.seek(0)
        with _pillow_warnings_off(), _open_unchecked(source, formats=None) as im:
            return im.format
    except Exception:  # noqa: BLE001 - only to name the format in a message; anything else: unknown
        return None


def _is_empty(source: Path | io.BytesIO) -> bool:
    try:
        return source.stat().st_size == 0 if isinstance(source, Path) else not source.getbuffer().nbytes
    except OSError:
        return False


def _check_size(path: Path, size: tuple[int, int], max_pixels: int | None) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise FileError(path, f"image has no pixels ({width}x{height})")
    check_pixels(path, width, height, max_pixels)


def check_pixels(path: Path, width: int, height: int, max_pixels: int | None, what: str = "image") -> None:
    """A ``FileError`` when an image of ``width`` x ``height`` (read, or to be made: ``what``) has
    more than ``max_pixels`` pixels (None: no limit), said before any of its pixels exist."""
    if max_pixels is not None and width * height > max_pixels:
        raise FileError(path, _too_large(width, height, max_pixels, what))


def _too_large(width: int, height: int, max_pixels: int, what: str = "image") -> str:
    return (
        f"{what} is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
        "(a decompression bomb?); raise it with --max-pixels"
    )




_pillow_lock = threading.Lock()


def _open_unchecked(path: Path | io.BytesIO, formats: tuple[str, ...] | None = READ_FORMATS) -> Image.Image:
    """``Image.open`` (which reads the header only) without Pillow's bomb check, so that ours can
    name the image's size. Pillow's limit is a process-wide setting: it is lifted only for the
    duration of the header parse, under a lock."""
    with _pillow_lock:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path, formats=formats)
        finally:
            Image.MAX_IMAGE_PIXELS = old


_quiet_lock = threading.Lock()
_quiet: list = []  # [the catch_warnings context, the number of loads in progress]


@contextlib.contextmanager
def _pillow_warnings_off():
    """Pillow's warnings (corrupt EXIF, an ICO not of the size it said, decompression bombs) are not
    shown while images load: a damaged file gets its one-line error, or loads, and nothing else.

    ``warnings.catch_warnings`` is process-wide and not thread-safe when nested from several
    threads, so the first load in progress installs the filter and the last one restores the
    warnings as they were.
    """
    with _quiet_lock:
        if not _quiet:
            context = warnings.catch_warnings()
            context.__enter__()
            warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            _quiet.extend([context, 0])
        _quiet[1] += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet[1] -= 1
            if _quiet[1] == 0:
                context = _quiet[0]
                _quiet.clear()
                context.__exit__(None, None, None)


def _allow_pillow(max_pixels: int | None) -> None:
    """Raise Pillow's own bomb limit (a process-wide setting) to at least ``max_pixels``.

    Only ever raised, never lowered, so that threads loading at once cannot undo each other; our
    own check in ``load_image`` is what enforces the limit each caller asked for.
    """
    with _pillow_lock:
        current = Image.MAX_IMAGE_PIXELS
        if current is None:
            return
        if max_pixels is None:
            Image.MAX_IMAGE_PIXELS = None
        elif max_pixels > current:
            Image.MAX_IMAGE_PIXELS = max_pixels


def pil_to_rgb(im: Image.Image, details: dict | None = None) -> np.ndarray:
    """A PIL image's pixels as ``load_image`` gives a file's: upright, in sRGB, RGB float32 in [0, 1]
    (``details`` as ``load_image``'s)."""
    return _to_rgb_float(to_srgb(ImageOps.exif_transpose(im), details))


_SRGB = ImageCms.createProfile("sRGB")


def profile_name(icc: bytes) -> str:
    """An ICC profile's description (its name), or "" when it has none or cannot be parsed."""
    try:
        return ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc))).strip()
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return ""


def to_srgb(im: Image.Image, details: dict | None = None) -> Image.Image:
    """``im`` converted to sRGB from its embedded ICC profile (RGB and RGBA images); unchanged when it
    has none, when the profile is sRGB's, or when the profile cannot be used (the pixels are then
    taken as sRGB, as every viewer without colour management shows them)."""
    icc = im.info.get("icc_profile")
    if not icc or im.mode not in ("RGB", "RGBA"):
        return im
    name = profile_name(icc)
    if not name or "srgb" in name.lower().replace(" ", "").replace("-", ""):
        return im
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        converted = ImageCms.profileToProfile(
            im, source, _SRGB, renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC, outputMode=im.mode
        )
    except (ImageCms.PyCMSError, OSError, ValueError):
        return im
    if details is not None:
        details["icc_profile"] = name
    return converted


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
    mark: bool | str = True,
) -> None:
    """Write a [0, 1] float or uint8 (H, W, 3) image atomically.

    With ``mark`` the file carries vqcli's EXIF ``Software`` tag (see ``written_by_vqcli``); a
    string ``mark`` follows ``vqcli`` there (what the image was made from, see ``vqcli_mark``).
    """
    pil_format = OUTPUT_FORMATS[fmt]
    pixels = rgb if rgb.dtype == np.uint8 else to_uint8(rgb)
    image = Image.fromarray(pixels) if pixels.ndim == 3 else Image.fromarray(pixels)
    options: dict = {"quality": quality} if pil_format in ("JPEG", "WEBP") else {}
    if mark:
        options["exif"] = vqcli_exif(mark)
    with atomic_path(path, overwrite=overwrite) as tmp:
        image.save(tmp, format=pil_format, **options)


def vqcli_exif(mark: bool | str = True) -> Image.Exif:
    """The EXIF that marks an image as vqcli's (``Software``: ``vqcli``, then ``mark`` if a string)."""
    exif = Image.Exif()
    exif[SOFTWARE_TAG] = f"{SOFTWARE} {mark}" if isinstance(mark, str) else SOFTWARE
    return exif


def written_by_vqcli(path: str | os.PathLike) -> bool:
    """True when ``path`` is an image that ``save_image`` wrote (it reads the header only)."""
    return vqcli_mark(path) is not None


def vqcli_mark(path: str | os.PathLike) -> str | None:
    """The string ``save_image`` wrote after ``vqcli`` in the file's EXIF (``""`` for none), or
    ``None`` when the file is not an image it wrote (the header only is read)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                software = im.getexif().get(SOFTWARE_TAG)
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return None
    if not isinstance(software, str) or software.split(" ")[0] != SOFTWARE:
        return None
    return software.partition(" ")[2]


def format_matches(path: str | os.PathLike, fmt: str) -> bool:
    """Whether the file name's extension is one the output format ``fmt`` is known by."""
    return Path(path).suffix.lower() in FORMAT_EXTENSIONS[fmt]
