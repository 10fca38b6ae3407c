"""Every photo a user owns read right: colour profiles converted to sRGB (against ImageCms applied
directly), AVIF, HEIC (or the line saying how to add it), animated images noted."""

from __future__ import annotations

import io
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms, features
from typer.testing import CliRunner

import vqcli
from vqcli import AutoEncoder, AutoEncoderConfig
from vqcli.checkpoints.native import save_native
from vqcli.cli import app
from vqcli.errors import FileError
from vqcli.io.images import HEIF_HINT, load_image

runner = CliRunner()
KL = AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)


# --- an ICC profile built here: a matrix/TRC RGB profile (ICC v2), with Adobe RGB (1998)'s primaries


def _s15(x: float) -> bytes:
    return struct.pack(">i", round(x * 65536))


def _xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ " + b"\0" * 4 + _s15(x) + _s15(y) + _s15(z)


def _curve(gamma: float) -> bytes:
    return b"curv" + b"\0" * 4 + struct.pack(">IH", 1, round(gamma * 256)) + b"\0\0"


def _desc(text: str) -> bytes:
    a = text.encode("ascii") + b"\0"
    return b"desc" + b"\0" * 4 + struct.pack(">I", len(a)) + a + struct.pack(">II", 0, 0) + b"\0" * 70


def matrix_profile(name: str, red, green, blue, gamma: float) -> bytes:
    d50 = (0.9642, 1.0, 0.8249)
    tags = [(b"desc", _desc(name)), (b"wtpt", _xyz(*d50)), (b"rXYZ", _xyz(*red)), (b"gXYZ", _xyz(*green)),
            (b"bXYZ", _xyz(*blue)), (b"rTRC", _curve(gamma)), (b"gTRC", _curve(gamma)), (b"bTRC", _curve(gamma))]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for sig, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    header = (struct.pack(">I", offset + len(data)) + b"\0" * 4 + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ "
              + b"\0" * 12 + b"acsp" + b"\0" * 28 + _s15(d50[0]) + _s15(d50[1]) + _s15(d50[2]) + b"\0" * 48)
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + data


ADOBE_RGB = matrix_profile(
    "Test Adobe RGB (1998)", (0.60974, 0.31111, 0.01947), (0.20528, 0.62567, 0.06087), (0.14919, 0.06322, 0.74457), 2.2
)


def _pixels(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "kl.safetensors"
    save_native(AutoEncoder(KL), path)
    return path


def test_icc_profile_is_converted_to_srgb_as_imagecms_does(tmp_path, model_path):
    pixels = _pixels(12, 16)
    Image.fromarray(pixels).save(tmp_path / "adobe.png", icc_profile=ADOBE_RGB)
    Image.fromarray(pixels).save(tmp_path / "plain.png")
    details: dict = {}
    got = load_image(tmp_path / "adobe.png", details=details)
    oracle = ImageCms.profileToProfile(
        Image.fromarray(pixels), ImageCms.ImageCmsProfile(io.BytesIO(ADOBE_RGB)), ImageCms.createProfile("sRGB"),
        renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC, outputMode="RGB",
    )
    assert np.array_equal(np.rint(got * 255).astype(np.uint8), np.asarray(oracle))
    assert details == {"icc_profile": "Test Adobe RGB (1998)"}
    assert np.abs(np.asarray(oracle).astype(int) - pixels).max() > 10  # (the conversion changes the pixels)
    plain_details: dict = {}
    assert np.array_equal(np.rint(load_image(tmp_path / "plain.png", details=plain_details) * 255), pixels)
    assert plain_details == {}
    # an sRGB-tagged image is taken as it is
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(pixels).save(tmp_path / "srgb.png", icc_profile=srgb)
    assert np.array_equal(np.rint(load_image(tmp_path / "srgb.png") * 255), pixels)

    # the latent file names the source profile; the API agrees with the command line
    r = runner.invoke(app, ["encode", str(tmp_path / "adobe.png"), "-o", str(tmp_path / "lat"), "--model", str(model_path), "-q"])
    assert r.exit_code == 0, r.output
    latent = vqcli.read_latent(tmp_path / "lat" / "adobe.png.safetensors")
    assert latent.meta.icc_profile == "Test Adobe RGB (1998)"
    api = vqcli.load(str(model_path)).encode_image(tmp_path / "adobe.png")
    assert api.meta.icc_profile == "Test Adobe RGB (1998)" and torch.equal(api.tensor, latent.tensor)


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow does not read AVIF")
def test_avif_round_trips(tmp_path, model_path):
    (tmp_path / "in").mkdir()
    Image.fromarray(_pixels(18, 22)).save(tmp_path / "in" / "photo.avif", quality=90)
    with Image.open(tmp_path / "in" / "photo.avif") as im:
        decoded_by_pillow = np.asarray(im.convert("RGB"))
    assert np.array_equal(np.rint(load_image(tmp_path / "in" / "photo.avif") * 255), decoded_by_pillow)
    r = runner.invoke(app, ["encode", str(tmp_path / "in"), "-o", str(tmp_path / "lat"), "--model", str(model_path), "--json"])
    assert r.exit_code == 0, r.output
    assert '"done": 1' in r.stdout
    r = runner.invoke(app, ["decode", str(tmp_path / "lat"), "-o", str(tmp_path / "rec"), "--model", str(model_path), "-q"])
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "rec" / "photo.avif.png").size == (22, 18)


def _heic_header() -> bytes:
    """The first box of a HEIC file (what phones write), then nothing a decoder could use."""
    return struct.pack(">I", 24) + b"ftypheic" + struct.pack(">I", 0) + b"mif1heic" + b"\0" * 32


def test_heic_without_pillow_heif_says_how_to_add_it(tmp_path, model_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # (import fails, as where it is not installed)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "IMG_0001.HEIC").write_bytes(_heic_header())
    with pytest.raises(FileError, match="pip install 'vqcli\\[heif\\]'"):
        load_image(tmp_path / "in" / "IMG_0001.HEIC")
    r = runner.invoke(app, ["encode", str(tmp_path / "in"), "-o", str(tmp_path / "lat"), "--model", str(model_path)])
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines()[0] == f"{tmp_path / 'in' / 'IMG_0001.HEIC'}: {HEIF_HINT}"


def test_heic_is_read_with_pillow_heif(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")
    pixels = _pixels(16, 20)
    heif = pillow_heif.from_pillow(Image.fromarray(pixels))
    heif.save(tmp_path / "a.heic", quality=-1)
    oracle = np.asarray(pillow_heif.open_heif(tmp_path / "a.heic").to_pillow().convert("RGB"))
    assert np.array_equal(np.rint(load_image(tmp_path / "a.heic") * 255), oracle)


def test_animated_image_gives_a_note_per_file(tmp_path, model_path):
    (tmp_path / "in").mkdir()
    frames = [Image.fromarray(_pixels(10, 12, seed)) for seed in range(3)]
    frames[0].save(tmp_path / "in" / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    Image.fromarray(_pixels(10, 12)).save(tmp_path / "in" / "still.png")
    r = runner.invoke(app, ["encode", str(tmp_path / "in"), "-o", str(tmp_path / "lat"), "--model", str(model_path)])
    assert r.exit_code == 0, r.output
    notes = [line for line in r.stderr.splitlines() if "frames" in line]
    assert notes == [f"{tmp_path / 'in' / 'anim.gif'}: only the first of its 3 frames was used (an animated image)"]
    r = runner.invoke(app, ["encode", str(tmp_path / "in"), "-o", str(tmp_path / "lat2"), "--model", str(model_path), "-q"])
    assert r.exit_code == 0 and "frames" not in r.stderr
