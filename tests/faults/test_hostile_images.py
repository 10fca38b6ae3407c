"""Hostile images: truncated, empty and corrupt files of every format vqcli reads, formats it does
not read (one of them handed by Pillow to Ghostscript), extensions that lie, decompression bombs
and headers claiming enormous sizes.

Decisions tested here (documented in ``vqcli.images``): the format comes from the content, among
the formats vqcli reads only, never from the name; images over ``--max-pixels`` (Pillow's own
limit by default) are refused from their header, before decoding, with the size in the message.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vqcli import AutoEncoder, AutoEncoderConfig
from vqcli.checkpoints.native import save_native
from vqcli.cli import app
from vqcli.errors import FileError
from vqcli.io.images import DEFAULT_MAX_PIXELS, READ_FORMATS, load_image
from vqcli.io.latents import read_latent

from .conftest import run

KL = AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)
# one file extension per format vqcli reads
EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "BMP": "bmp", "DIB": "dib", "GIF": "gif", "TIFF": "tif",
              "PPM": "ppm", "TGA": "tga", "ICO": "ico", "QOI": "qoi"}
if "AVIF" in READ_FORMATS:  # (where this Pillow reads AVIF)
    EXTENSIONS["AVIF"] = "avif"


def test_every_format_read_is_exercised():
    assert set(EXTENSIONS) == set(READ_FORMATS)
    assert DEFAULT_MAX_PIXELS == Image.MAX_IMAGE_PIXELS  # Pillow's decompression-bomb limit, kept


def pixels(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def encoded(fmt: str, px: np.ndarray, **kw) -> bytes:
    b = io.BytesIO()
    Image.fromarray(px).save(b, format=fmt, **kw)
    return b.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A 70-byte PNG whose header claims ``width`` x ``height`` RGB pixels (no pixel data to speak of)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def tiff_second_page_without_width(px: np.ndarray) -> bytes:
    """A two-page TIFF whose second page's ImageWidth tag (256) is renamed to an unknown one:
    counting its pages makes Pillow raise TypeError ("Missing dimensions")."""
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "TIFF", save_all=True, append_images=[Image.fromarray(px[::-1])])
    data = bytearray(buf.getvalue())
    assert data[:4] == b"II*\0"
    first = struct.unpack_from("<I", data, 4)[0]
    second = struct.unpack_from("<I", data, first + 2 + 12 * struct.unpack_from("<H", data, first)[0])[0]
    for i in range(struct.unpack_from("<H", data, second)[0]):
        entry = second + 2 + 12 * i
        if struct.unpack_from("<H", data, entry)[0] == 256:
            struct.pack_into("<H", data, entry, 65000)
            return bytes(data)
    raise AssertionError("no ImageWidth tag on the second page")


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n0 setgray 0 0 16 16 rectfill showpage\n"


# --- the whole list in one run of the installed command ------------------------------------------


@pytest.fixture(scope="module")
def hostile_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-images")
    torch.manual_seed(0)
    save_native(AutoEncoder(KL), root / "kl.safetensors")
    d = root / "images"
    d.mkdir()
    px = pixels()
    good, bad = [], {}
    for fmt, ext in EXTENSIONS.items():
        data = encoded(fmt, px)
        (d / f"good.{ext}").write_bytes(data)
        good.append(f"good.{ext}")
        (d / f"truncated.{ext}").write_bytes(data[: len(data) // 2])
        bad[f"truncated.{ext}"] = "cannot decode image"
        (d / f"empty.{ext}").write_bytes(b"")
        bad[f"empty.{ext}"] = "empty file (0 bytes), not an image"
        corrupt = bytearray(data)
        corrupt[:16] = bytes(range(16))  # the signature and the first header fields
        (d / f"corrupt-header.{ext}").write_bytes(bytes(corrupt))
        bad[f"corrupt-header.{ext}"] = "not an image"
    # a PNG whose IDAT data is damaged (its CRC no longer matches)
    data = bytearray(encoded("PNG", px))
    data[60] ^= 0xFF
    (d / "corrupt-data.png").write_bytes(bytes(data))
    bad["corrupt-data.png"] = "cannot decode image"
    # a later page without its dimensions (Pillow raises TypeError counting the pages)
    (d / "page-2-without-width.tif").write_bytes(tiff_second_page_without_width(px))
    bad["page-2-without-width.tif"] = "cannot decode image (Missing dimensions)"
    # extensions that lie: read by content
    (d / "png-named.jpg").write_bytes(encoded("PNG", px))
    (d / "jpeg-named.png").write_bytes(encoded("JPEG", px, quality=95))
    (d / "webp-named.tif").write_bytes(encoded("WEBP", px, lossless=True))
    good += ["png-named.jpg", "jpeg-named.png", "webp-named.tif"]
    # formats vqcli does not read, whatever their name
    (d / "eps-named.png").write_bytes(EPS)
    bad["eps-named.png"] = "an image in the EPS format, which vqcli does not read"
    (d / "pcx-named.bmp").write_bytes(encoded("PCX", px))
    bad["pcx-named.bmp"] = "an image in the PCX format, which vqcli does not read"
    (d / "text.gif").write_text("GIF89a? no, just text")
    bad["text.gif"] = "not an image"
    # enormous dimensions in a tiny file
    (d / "claims-100000x100000.png").write_bytes(png_header_only(100_000, 100_000))
    bad["claims-100000x100000.png"] = (
        "image is 100000x100000 = 10,000,000,000 pixels, over the limit of 89,478,485 (a decompression bomb?); "
        "raise it with --max-pixels"
    )
    bmp = bytearray(encoded("BMP", px))
    struct.pack_into("<ii", bmp, 18, 60_000, 60_000)
    (d / "claims-60000x60000.bmp").write_bytes(bytes(bmp))
    bad["claims-60000x60000.bmp"] = "60000x60000 = 3,600,000,000 pixels, over the limit"
    return {"root": root, "folder": d, "good": good, "bad": bad, "pixels": px}


@pytest.mark.slow
def test_encode_over_a_folder_of_hostile_images(hostile_images):
    root, d, bad = hostile_images["root"], hostile_images["folder"], hostile_images["bad"]
    out = root / "out"
    done = run("encode", d, "-o", out, "--model", root / "kl.safetensors", "--json")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "Warning" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == len(bad), "\n".join(lines)
    for name, reason in bad.items():
        mine = [line for line in lines if line.startswith(f"{d / name}: ")]
        assert len(mine) == 1, (name, lines)
        assert reason in mine[0], (name, mine[0])
    summary = json.loads(done.stdout)
    assert summary["done"] == len(hostile_images["good"]) and summary["failed"] == len(bad)
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(f"{name}.safetensors" for name in hostile_images["good"])
    # a PNG named .jpg is the PNG it is: the same latent as the same PNG named .png
    assert torch.equal(read_latent(out / "png-named.jpg.safetensors").tensor, read_latent(out / "good.png.safetensors").tensor)
    assert torch.equal(read_latent(out / "webp-named.tif.safetensors").tensor, read_latent(out / "good.png.safetensors").tensor)


def test_an_error_pillow_raises_on_a_damaged_file_is_that_files_error(tmp_path):
    """TypeError is no usual decoding error: Pillow raises it on a TIFF page without dimensions."""
    path = _write(tmp_path / "pages.tif", tiff_second_page_without_width(pixels()))
    with pytest.raises(FileError) as caught:
        load_image(path)
    assert caught.value.path == str(path) and caught.value.reason == "cannot decode image (Missing dimensions)"


def test_the_same_error_raised_by_vqcli_itself_is_not_dressed_up_as_a_damaged_file(tmp_path, monkeypatch):
    """A TypeError from vqcli's own code is a bug: it surfaces as such, not as "cannot decode"."""
    import vqcli.io.images as images

    def buggy(im, details=None):
        raise TypeError("a bug of ours")

    monkeypatch.setattr(images, "pil_to_rgb", buggy)
    path = _write(tmp_path / "good.png", encoded("PNG", pixels()))
    with pytest.raises(TypeError, match="a bug of ours"):
        load_image(path)


# --- the pixel limit, both sides ------------------------------------------------------------------


def test_max_pixels_option_refuses_above_and_can_be_raised(tmp_path):
    torch.manual_seed(0)
    save_native(AutoEncoder(KL), tmp_path / "kl.safetensors")
    d = tmp_path / "images"
    d.mkdir()
    Image.fromarray(pixels(30, 40)).save(d / "medium.png")  # 1,200 pixels
    Image.fromarray(pixels(20, 20)).save(d / "small.png")  # 400 pixels
    args = ["encode", str(d), "-o", str(tmp_path / "out"), "--model", str(tmp_path / "kl.safetensors"), "--quiet"]
    result = CliRunner().invoke(app, [*args, "--max-pixels", "1000"])
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"{d / 'medium.png'}: image is 40x30 = 1,200 pixels, over the limit of 1,000 (a decompression bomb?); "
        "raise it with --max-pixels"
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["small.png.safetensors"]
    result = CliRunner().invoke(app, [*args, "--max-pixels", "1200"])
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["medium.png.safetensors", "small.png.safetensors"]
    result = CliRunner().invoke(app, [*args, "--max-pixels", "0", "--overwrite"])  # 0: no limit
    assert result.exit_code == 0, result.stderr


def test_a_lying_header_is_refused_before_anything_is_allocated(tmp_path):
    """A 70-byte PNG claiming 100000x100000 pixels (30 GB as RGB, 120 GB as float32): refused with
    its size, and the process's peak memory does not move (measured in a fresh process)."""
    (tmp_path / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    script = f"""
import json
from vqcli.io.images import load_image
from vqcli.errors import FileError

def peak_kb():
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1])

before = peak_kb()
try:
    load_image({str(tmp_path / "bomb.png")!r})
    reason = None
except FileError as e:
    reason = e.reason
print(json.dumps({{"reason": reason, "grew_kb": peak_kb() - before}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["reason"].startswith("image is 100000x100000 = 10,000,000,000 pixels, over the limit of 89,478,485")
    assert result["grew_kb"] < 32 * 1024, result


def test_a_container_cannot_smuggle_a_larger_image(tmp_path):
    """An ICO whose directory says 16x16 around a 300x200 PNG is held to the limit by its real size."""
    png = encoded("PNG", pixels(200, 300))
    ico = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 22) + png
    (tmp_path / "liar.ico").write_bytes(ico)
    with pytest.raises(FileError, match=r"image is 300x200 = 60,000 pixels, over the limit of 1,000"):
        load_image(tmp_path / "liar.ico", max_pixels=1000)
    assert load_image(tmp_path / "liar.ico").shape == (200, 300, 3)


# --- formats and names ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(EXTENSIONS))
def test_every_truncation_of_every_format_is_an_error_or_the_whole_image(fmt, tmp_path):
    """Cut anywhere: a FileError, or (a cut past the pixel data: a trailer, later frames) the image
    itself. Cut at half: always an error. Never another exception."""
    px = pixels()
    data = encoded(fmt, px)
    full = load_image(_write(tmp_path / f"full.{EXTENSIONS[fmt]}", data))
    for cut in sorted({0, 1, 8, 16, 32, *range(0, len(data), max(1, len(data) // 23)), len(data) - 1}):
        path = _write(tmp_path / f"cut{cut}.{EXTENSIONS[fmt]}", data[:cut])
        try:
            image = load_image(path)
        except FileError as e:
            assert e.path == str(path) and "\n" not in str(e)
            continue
        np.testing.assert_array_equal(image, full, err_msg=f"{fmt} cut at {cut} of {len(data)}")
    with pytest.raises(FileError):
        load_image(_write(tmp_path / f"half.{EXTENSIONS[fmt]}", data[: len(data) // 2]))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("real, name", [("PNG", "a.jpg"), ("JPEG", "a.png"), ("WEBP", "a.gif"), ("TIFF", "a.bmp"),
                                        ("BMP", "a.webp"), ("QOI", "a.tif")])
def test_a_lying_extension_is_read_by_content(real, name, tmp_path):
    px = pixels()
    data = encoded(real, px, **({"quality": 95} if real == "JPEG" else {}))
    truthful = load_image(_write(tmp_path / f"truth.{EXTENSIONS[real]}", data))
    np.testing.assert_array_equal(load_image(_write(tmp_path / name, data)), truthful)
    np.testing.assert_array_equal(load_image(_write(tmp_path / "no-extension", data)), truthful)


def test_eps_never_reaches_ghostscript(tmp_path, monkeypatch):
    """Pillow opens EPS files and hands them to Ghostscript to decode; vqcli must not."""
    from PIL import EpsImagePlugin

    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(OSError("trap")))
    path = _write(tmp_path / "drawing.png", EPS)
    with pytest.raises(FileError, match="an image in the EPS format, which vqcli does not read"):
        load_image(path)
    assert calls == []
    # control: Pillow left to itself does call it
    with Image.open(path) as im, pytest.raises(OSError, match="trap"):
        im.load()
    assert len(calls) == 1
