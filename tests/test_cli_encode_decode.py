"""``vqcli encode`` and ``vqcli decode`` end to end: files written and read back, exit codes, messages.

The models are tiny (built and saved here); the oracle for every latent and image is the
AutoEncoder itself, called directly on the image padded by numpy's reflection.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from vqcli import AutoEncoder, AutoEncoderConfig
from vqcli.checkpoints.native import load_native, save_native
from vqcli.cli import app
from vqcli.io.atomic import TMP_PREFIX

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_images"
VQCLI = shutil.which("vqcli")

KL_CONFIG = AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)
VQ_CONFIG = AutoEncoderConfig(kind="vq", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, n_embed=64)
# f8 (latent attention over 64x64 tokens, not 256x256), for the 512-pixel sample photographs
KL8_CONFIG = AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=4)


def _save_model(path: Path, config: AutoEncoderConfig, seed: int) -> Path:
    torch.manual_seed(seed)
    model = AutoEncoder(config)
    with torch.no_grad():  # a codebook spread like the encoder's outputs, so that many codes are used
        if config.kind == "vq":
            model.quantize.embedding.weight.normal_(0, 0.3)
    save_native(model, path)
    return path


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {
        "kl": _save_model(d / "kl.safetensors", KL_CONFIG, 0),
        "kl_other": _save_model(d / "kl-other.safetensors", KL_CONFIG, 1),
        "vq": _save_model(d / "vq.safetensors", VQ_CONFIG, 2),
        "kl8": _save_model(d / "kl8.safetensors", KL8_CONFIG, 3),
    }


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A crop of a sample photograph (real image content), uint8 RGB."""
    rgb = np.asarray(Image.open(SAMPLES / "astronaut.png").convert("RGB"))
    y, x = (seed * 37) % (rgb.shape[0] - height), (seed * 53) % (rgb.shape[1] - width)
    return rgb[y : y + height, x : x + width].copy()


def _write(path: Path, pixels: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **kw)
    return path


@pytest.fixture
def images(tmp_path) -> Path:
    """A folder of small images of awkward sizes, one in a subfolder."""
    root = tmp_path / "images"
    _write(root / "odd.png", _photo(17, 33, 1))
    _write(root / "tall.png", _photo(33, 17, 2))
    _write(root / "one.png", _photo(1, 1, 3))
    _write(root / "square.jpg", _photo(16, 16, 4), quality=95)
    _write(root / "sub" / "deep.png", _photo(20, 24, 5))
    (root / "notes.txt").write_text("not an image, and not one by its extension: skipped")
    return root


runner = CliRunner()


def cli(*args: str, env: dict | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def _load_model(path: Path) -> AutoEncoder:
    return load_native(path).eval()


def _reflect_pad(rgb: np.ndarray, factor: int) -> torch.Tensor:
    """The oracle for the model input: [-1, 1], mirrored on the right and bottom (numpy's 'reflect';
    'edge' for the part of a side too short to mirror)."""
    h, w = rgb.shape[:2]
    if h <= factor and w <= factor:
        factor *= 2
    ph, pw = -(-h // factor) * factor - h, -(-w // factor) * factor - w
    x = rgb.astype(np.float32)
    while ph or pw:
        mh, mw = min(ph, x.shape[0] - 1), min(pw, x.shape[1] - 1)
        if mh == 0 and mw == 0:
            x = np.pad(x, ((0, ph), (0, pw), (0, 0)), mode="edge")
            break
        x = np.pad(x, ((0, mh), (0, mw), (0, 0)), mode="reflect")
        ph, pw = ph - mh, pw - mw
    return torch.from_numpy(x).permute(2, 0, 1)[None] * 2 - 1


def _read_latent(path: Path) -> tuple[torch.Tensor, dict]:
    with safe_open(str(path), "pt") as f:
        return f.get_tensor("latent"), f.metadata()


# --- round trips --------------------------------------------------------------------------------


def test_encode_decode_round_trip_restores_every_size(tmp_path, models, images):
    r = cli("encode", images, "-o", tmp_path / "lat", "--model", models["kl"])
    assert r.exit_code == 0, r.output
    names = sorted(p.relative_to(tmp_path / "lat").as_posix() for p in (tmp_path / "lat").rglob("*") if p.is_file())
    assert names == [
        "odd.png.safetensors",
        "one.png.safetensors",
        "square.jpg.safetensors",
        "sub/deep.png.safetensors",
        "tall.png.safetensors",
    ]
    assert "5 encoded" in r.stdout

    r = cli("decode", tmp_path / "lat", "-o", tmp_path / "rec", "--model", models["kl"])
    assert r.exit_code == 0, r.output
    for src, out in [
        ("odd.png", "odd.png"),
        ("tall.png", "tall.png"),
        ("one.png", "one.png"),
        ("square.jpg", "square.jpg.png"),
        ("sub/deep.png", "sub/deep.png"),
    ]:
        with Image.open(images / src) as a, Image.open(tmp_path / "rec" / out) as b:
            assert b.size == a.size, (src, out)
            assert b.format == "PNG" and b.mode == "RGB"


def test_latent_and_image_equal_the_model_called_directly(tmp_path, models, images):
    """Oracle: AutoEncoder.encode on the numpy-mirrored image; decode cropped to the original size."""
    model = _load_model(models["kl"])
    assert cli("encode", images, "-o", tmp_path / "lat", "--model", models["kl"]).exit_code == 0
    assert cli("decode", tmp_path / "lat", "-o", tmp_path / "rec", "--model", models["kl"]).exit_code == 0
    for name in ("odd.png", "one.png", "tall.png"):
        rgb = np.asarray(Image.open(images / name).convert("RGB")) / 255.0
        with torch.no_grad():
            expected = model.encode(_reflect_pad(rgb, 2))[0]
            image = model.decode(expected[None])[0, :, : rgb.shape[0], : rgb.shape[1]]
        latent, meta = _read_latent(tmp_path / "lat" / f"{name}.safetensors")
        assert latent.dtype == torch.float32
        torch.testing.assert_close(latent, expected, atol=1e-5, rtol=1e-5)
        assert (int(meta["width"]), int(meta["height"])) == (rgb.shape[1], rgb.shape[0])
        pixels = np.rint(((image.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy() * 255)
        decoded = np.asarray(Image.open(tmp_path / "rec" / name), dtype=np.float64)
        assert np.abs(decoded - pixels).max() <= 1


def test_vq_latents_are_small_integer_indices(tmp_path, models, images):
    model = _load_model(models["vq"])
    r = cli("encode", images, "-o", tmp_path / "lat", "--model", models["vq"], "--json")
    assert r.exit_code == 0, r.output
    rgb = np.asarray(Image.open(images / "odd.png").convert("RGB")) / 255.0
    with torch.no_grad():
        expected = model.encode_indices(_reflect_pad(rgb, 2))[0]
    latent, meta = _read_latent(tmp_path / "lat" / "odd.png.safetensors")
    assert latent.dtype == torch.int16 and meta["dtype"] == "int16"
    assert latent.shape == (9, 17)  # 17x33 padded to 18x34, f = 2
    assert torch.equal(latent.long(), expected)
    assert len(torch.unique(latent)) > 1
    assert cli("decode", tmp_path / "lat", "-o", tmp_path / "rec", "--model", models["vq"]).exit_code == 0
    with torch.no_grad():
        image = model.decode_indices(expected[None])[0, :, :17, :33]
    pixels = np.rint(((image.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy() * 255)
    assert np.abs(np.asarray(Image.open(tmp_path / "rec" / "odd.png"), dtype=np.float64) - pixels).max() <= 1


def test_batches_give_the_same_latents_as_single_images(tmp_path, models):
    root = tmp_path / "same"
    for i in range(5):
        _write(root / f"{i}.png", _photo(24, 40 if i % 2 else 24, i))
    assert cli("encode", root, "-o", tmp_path / "b1", "--model", models["kl"]).exit_code == 0
    r = cli("encode", root, "-o", tmp_path / "b4", "--model", models["kl"], "--batch-size", "4")
    assert r.exit_code == 0, r.output
    for i in range(5):
        a, _ = _read_latent(tmp_path / "b1" / f"{i}.png.safetensors")
        b, _ = _read_latent(tmp_path / "b4" / f"{i}.png.safetensors")
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_sample_images_round_trip(tmp_path, models):
    r = cli("encode", SAMPLES, "-o", tmp_path / "lat", "--model", models["kl8"], "--batch-size", "2")
    assert r.exit_code == 0, r.output
    r = cli("decode", tmp_path / "lat", "-o", tmp_path / "rec", "--model", models["kl8"], "--format", "jpg")
    assert r.exit_code == 0, r.output
    for src in sorted(SAMPLES.iterdir()):
        out = tmp_path / "rec" / (src.name if src.suffix == ".jpg" else src.name + ".jpg")
        with Image.open(src) as a, Image.open(out) as b:
            assert b.format == "JPEG" and b.size == a.size


def test_decode_formats(tmp_path, models, images):
    assert cli("encode", images / "odd.png", "-o", tmp_path / "lat", "--model", models["kl"]).exit_code == 0
    for fmt, pil in (("webp", "WEBP"), ("jpg", "JPEG"), ("png", "PNG")):
        r = cli("decode", tmp_path / "lat", "-o", tmp_path / fmt, "--model", models["kl"], "--format", fmt)
        assert r.exit_code == 0, r.output
        name = "odd.png" if fmt == "png" else f"odd.png.{fmt}"
        with Image.open(tmp_path / fmt / name) as im:
            assert im.format == pil and im.size == (33, 17)
    r = cli("decode", tmp_path / "lat", "-o", tmp_path / "x", "--format", "gif")
    assert r.exit_code == 2 and "gif" in r.output


# --- names --------------------------------------------------------------------------------------


def test_same_stem_different_extensions_do_not_collide(tmp_path, models):
    root = tmp_path / "in"
    _write(root / "a.png", _photo(8, 8, 1))
    _write(root / "a.jpg", _photo(12, 10, 2))
    _write(root / "a.webp", _photo(6, 14, 3))
    assert cli("encode", root, "-o", tmp_path / "lat", "--model", models["kl"]).exit_code == 0
    for name, size in (("a.png", (8, 8)), ("a.jpg", (10, 12)), ("a.webp", (14, 6))):
        _, meta = _read_latent(tmp_path / "lat" / f"{name}.safetensors")
        assert meta["source"] == name and (int(meta["width"]), int(meta["height"])) == size
    assert cli("decode", tmp_path / "lat", "-o", tmp_path / "rec", "--model", models["kl"]).exit_code == 0
    assert sorted(p.name for p in (tmp_path / "rec").iterdir()) == ["a.jpg.png", "a.png", "a.webp.png"]
    assert Image.open(tmp_path / "rec" / "a.jpg.png").size == (10, 12)


def test_same_relative_path_under_two_inputs_is_refused(tmp_path, models):
    _write(tmp_path / "one" / "x.png", _photo(8, 8, 1))
    _write(tmp_path / "two" / "x.png", _photo(8, 8, 2))
    _write(tmp_path / "two" / "y.png", _photo(8, 8, 3))
    r = cli("encode", tmp_path / "one", tmp_path / "two", "-o", tmp_path / "lat", "--model", models["kl"])
    assert r.exit_code == 1
    assert f"{tmp_path / 'two' / 'x.png'}: its output" in r.stderr and str(tmp_path / "one" / "x.png") in r.stderr
    _, meta = _read_latent(tmp_path / "lat" / "x.png.safetensors")
    assert (tmp_path / "lat" / "y.png.safetensors").exists()


def test_output_paths_never_come_from_metadata(tmp_path, models, images):
    """A latent whose 'source' points elsewhere is still decoded to the name of the latent file."""
    from safetensors.torch import save_file

    assert cli("encode", images / "odd.png", "-o", tmp_path / "lat", "--model", models["kl"]).exit_code == 0
    latent, meta = _read_latent(tmp_path / "lat" / "odd.png.safetensors")
    meta["source"] = "../../escaped.png"
    save_file({"latent": latent}, str(tmp_path / "lat" / "odd.png.safetensors"), metadata=meta)
    assert cli("decode", tmp_path / "lat", "-o", tmp_path / "out" / "rec", "--model", models["kl"]).exit_code == 0
    assert (tmp_path / "out" / "rec" / "odd.png").is_file()
    assert not (tmp_path / "escaped.png").exists() and not (tmp_path / "out" / "escaped.png").exists()


# --- broken inputs ------------------------------------------------------------------------------


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims width x height pixels with almost no data: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_broken_files_fail_one_by_one_and_the_others_succeed(tmp_path, models):
    root = tmp_path / "in"
    _write(root / "good1.png", _photo(8, 8, 1))
    _write(root / "z" / "good2.png", _photo(10, 6, 2))
    (root / "empty.png").write_bytes(b"")
    good = (root / "good1.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "text.jpg").write_text("hello, I am not a JPEG")
    _png_header_only(root / "bomb.png", 100_000, 100_000)
    (root / "folder.png").mkdir()  # a folder named like an image: walked, not read as an image
    _write(root / "folder.png" / "inside.png", _photo(8, 8, 3))

    r = cli("encode", root, "-o", tmp_path / "lat", "--model", models["kl"], "--json")
    assert r.exit_code == 1
    summary = json.loads(r.stdout)
    failures = {Path(f["path"]).name: f["reason"] for f in summary["failures"]}
    assert set(failures) == {"empty.png", "truncated.png", "text.jpg", "bomb.png"}
    assert "not an image" in failures["empty.png"] and "not an image" in failures["text.jpg"]
    assert "cannot decode" in failures["truncated.png"] or "truncated" in failures["truncated.png"]
    assert "100000x100000" in failures["bomb.png"] and "decompression bomb" in failures["bomb.png"]
    # each failure printed once, as 'path: reason', on stderr
    for name, reason in failures.items():
        line = f"{root / name}: {reason}"
        assert r.stderr.count(line) == 1, (line, r.stderr)
    assert summary["done"] == 3 and summary["failed"] == 4
    for name in ("good1.png", "z/good2.png", "folder.png/inside.png"):
        assert (tmp_path / "lat" / f"{name}.safetensors").is_file()
    assert not any(p.name.startswith(TMP_PREFIX) for p in (tmp_path / "lat").rglob("*"))


def test_max_pixels_limit(tmp_path, models):
    _write(tmp_path / "in" / "big.png", _photo(40, 40, 1))
    r = cli("encode", tmp_path / "in", "-o", tmp_path / "lat", "--model", models["kl"], "--max-pixels", "1000")
    assert r.exit_code == 1 and "40x40 = 1,600 pixels, over the limit of 1,000" in r.stderr
    r = cli("encode", tmp_path / "in", "-o", tmp_path / "lat", "--model", models["kl"], "--max-pixels", "0")
    assert r.exit_code == 0, r.output


def test_broken_latents_fail_one_by_one(tmp_path, models, images):
    assert cli("encode", images, "-o", tmp_path / "lat", "--model", models["kl"]).exit_code == 0
    lat = tmp_path / "lat"
    (lat / "empty.png.safetensors").write_bytes(b"")
    data = (lat / "odd.png.safetensors").read_bytes()
    (lat / "cut.png.safetensors").write_bytes(data[: len(data) - 10])
    r = cli("decode", lat, "-o", tmp_path / "rec", "--model", models["kl"], "--json")
    assert r.exit_code == 1
    summary = json.loads(r.stdout)
    assert {Path(f["path"]).name for f in summary["failures"]} == {"empty.png.safetensors", "cut.png.safetensors"}
    assert summary["done"] == 5


# --- models -------------------------------------------------------------------------------------


def test_latent_from_another_model_is_refused(tmp_path, models, images):
    assert cli("encode", images / "odd.png", "-o", tmp_path / "lat", "--model", models["kl"]).exit_code == 0
    r = cli("decode", tmp_path / "lat", "-o", tmp_path / "rec", "--model", models["kl_other"])
    assert r.exit_code == 1
    line = r.stderr.strip()
    assert line.startswith(f"{tmp_path / 'lat' / 'odd.png.safetensors'}: made by model 'kl.safetensors'")
    assert "decode it with the model that encoded it" in line and "\n" not in line
    assert not (tmp_path / "rec" / "odd.png").exists()


def test_latent_of_a_weights_file_needs_model(tmp_path, models, images):
    assert cli("encode", images / "odd.png", "-o", tmp_path / "lat", "--model", models["kl"]).exit_code == 0
    r = cli("decode", tmp_path / "lat", "-o", tmp_path / "rec")
    assert r.exit_code == 1 and "made by the model file 'kl.safetensors'" in r.stderr and "--model" in r.stderr


def test_decode_needs_no_flags_for_an_embedded_model(tmp_path, models, images):
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(models["kl"], weights / "default.safetensors")
    shutil.copy(models["vq"], weights / "default-vq.safetensors")
    env = {"VQCLI_WEIGHTS_DIR": str(weights)}
    assert cli("encode", images, "-o", tmp_path / "lat", env=env).exit_code == 0
    assert cli("encode", images, "-o", tmp_path / "latvq", "--model", "default-vq", env=env).exit_code == 0
    _, meta = _read_latent(tmp_path / "lat" / "odd.png.safetensors")
    assert meta["model"] == "default" and meta["model_embedded"] == "true"
    # both embedded models' latents in one run, no flags
    shutil.copytree(tmp_path / "latvq", tmp_path / "lat" / "vq")
    r = cli("decode", tmp_path / "lat", "-o", tmp_path / "rec", "--json", env=env)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["done"] == 10
    assert Image.open(tmp_path / "rec" / "vq" / "odd.png").size == (33, 17)

    # retrained embedded weights: the old latents are refused, not decoded with the wrong model
    shutil.copy(models["kl_other"], weights / "default.safetensors")
    r = cli("decode", tmp_path / "lat" / "odd.png.safetensors", "-o", tmp_path / "rec2", env=env)
    assert r.exit_code == 1 and "made by model 'default'" in r.stderr and "the embedded model 'default'" in r.stderr


def test_missing_embedded_model_is_a_clear_usage_error(tmp_path, images):
    r = cli("encode", images, "-o", tmp_path / "lat", env={"VQCLI_WEIGHTS_DIR": str(tmp_path / "none")})
    assert r.exit_code == 2
    assert "embedded model 'default' is not installed" in r.stderr and "Traceback" not in r.output


def test_sample_and_seed(tmp_path, models, images):
    args = ("encode", images / "odd.png", "--model", models["kl"], "--sample")
    assert cli(*args, "-o", tmp_path / "s1", "--seed", "7").exit_code == 0
    assert cli(*args, "-o", tmp_path / "s2", "--seed", "7").exit_code == 0
    assert cli(*args, "-o", tmp_path / "s3", "--seed", "8").exit_code == 0
    assert cli("encode", images / "odd.png", "--model", models["kl"], "-o", tmp_path / "mean").exit_code == 0
    a, meta = _read_latent(tmp_path / "s1" / "odd.png.safetensors")
    b, _ = _read_latent(tmp_path / "s2" / "odd.png.safetensors")
    c, _ = _read_latent(tmp_path / "s3" / "odd.png.safetensors")
    mean, mean_meta = _read_latent(tmp_path / "mean" / "odd.png.safetensors")
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, mean)
    assert meta["representation"] == "sample" and "seed" in meta and mean_meta["representation"] == "mean"
    # the draw is mean + std * N(0, 1) with the recorded seed: reproduce it from the moments
    model = _load_model(models["kl"])
    rgb = np.asarray(Image.open(images / "odd.png").convert("RGB")) / 255.0
    g = torch.Generator().manual_seed(int(meta["seed"]))
    with torch.no_grad():
        expected = model.encode(_reflect_pad(rgb, 2), sample=True, generator=g)[0]
    torch.testing.assert_close(a, expected, atol=1e-5, rtol=1e-5)
    r = cli("encode", images / "odd.png", "--model", models["vq"], "--sample", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "KL models" in r.stderr


def test_scaled_latents(tmp_path, models, images):
    base = ("encode", images / "odd.png", "--model", models["kl"])
    assert cli(*base, "-o", tmp_path / "raw").exit_code == 0
    r = cli(*base, "-o", tmp_path / "scaled", "--scaled", "--scale-factor", "0.5", "--shift-factor", "0.25")
    assert r.exit_code == 0, r.output
    raw, _ = _read_latent(tmp_path / "raw" / "odd.png.safetensors")
    scaled, meta = _read_latent(tmp_path / "scaled" / "odd.png.safetensors")
    assert meta["scaled"] == "true" and float(meta["scale_factor"]) == 0.5 and float(meta["shift_factor"]) == 0.25
    torch.testing.assert_close(scaled, (raw - 0.25) * 0.5, atol=1e-6, rtol=1e-6)
    for name in ("raw", "scaled"):
        assert cli("decode", tmp_path / name, "-o", tmp_path / f"rec-{name}", "--model", models["kl"]).exit_code == 0
    a = np.asarray(Image.open(tmp_path / "rec-raw" / "odd.png"), dtype=int)
    b = np.asarray(Image.open(tmp_path / "rec-scaled" / "odd.png"), dtype=int)
    assert np.abs(a - b).max() <= 1


# --- resume, overwrite, never over inputs -------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


def test_resume_does_only_what_is_missing(tmp_path, models, images):
    assert cli("encode", images, "-o", tmp_path / "lat", "--model", models["kl"]).exit_code == 0
    (tmp_path / "lat" / "odd.png.safetensors").unlink()
    before = _snapshot(tmp_path / "lat")
    time.sleep(0.01)
    r = cli("encode", images, "-o", tmp_path / "lat", "--model", models["kl"], "--json")
    assert r.exit_code == 0
    s = json.loads(r.stdout)
    assert (s["done"], s["skipped"], s["failed"]) == (1, 4, 0)
    after = _snapshot(tmp_path / "lat")
    assert set(after) == set(before) | {"odd.png.safetensors"}
    assert all(after[k] == before[k] for k in before)  # untouched: same bytes and same mtime


def test_overwrite_replaces_outputs(tmp_path, models, images):
    assert cli("encode", images / "odd.png", "-o", tmp_path / "lat", "--model", models["kl"]).exit_code == 0
    r = cli("encode", images / "odd.png", "-o", tmp_path / "lat", "--model", models["vq"])
    assert r.exit_code == 1 and "exists, made with another model: --overwrite to replace" in r.stderr
    _, meta = _read_latent(tmp_path / "lat" / "odd.png.safetensors")
    assert meta["kind"] == "kl"  # stale, reported, and kept until --overwrite
    r = cli("encode", images / "odd.png", "-o", tmp_path / "lat", "--model", models["vq"], "--overwrite", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["done"] == 1
    _, meta = _read_latent(tmp_path / "lat" / "odd.png.safetensors")
    assert meta["kind"] == "vq"


def test_decoding_next_to_the_originals_never_replaces_them(tmp_path, models):
    photos = tmp_path / "photos"
    _write(photos / "a.png", _photo(16, 16, 1))
    _write(photos / "b.jpg", _photo(12, 12, 2), quality=90)
    originals = _snapshot(photos)
    assert cli("encode", photos, "-o", photos, "--model", models["kl"]).exit_code == 0
    for extra in ([], ["--overwrite"]):
        r = cli("decode", photos, "-o", photos, "--model", models["kl"], "--format", "jpg", *extra)
        assert r.exit_code == 1
        assert "not written by vqcli" in r.stderr and "not replaced" in r.stderr
        now = _snapshot(photos)
        assert all(now[k] == originals[k] for k in originals)
    # a.png.safetensors -> a.png.jpg is a new file and was written; b.jpg was refused
    assert (photos / "a.png.jpg").is_file()
    # decoding as png: a.png is refused, b.jpg.png is new
    r = cli("decode", photos, "-o", photos, "--model", models["kl"], "--overwrite")
    assert r.exit_code == 1 and r.stderr.count("not written by vqcli") == 1
    assert (photos / "b.jpg.png").is_file() and _snapshot(photos)["a.png"] == originals["a.png"]


def test_decode_overwrite_replaces_its_own_images(tmp_path, models, images):
    assert cli("encode", images / "odd.png", "-o", tmp_path / "lat", "--model", models["kl"]).exit_code == 0
    assert cli("decode", tmp_path / "lat", "-o", tmp_path / "rec", "--model", models["kl"]).exit_code == 0
    first = (tmp_path / "rec" / "odd.png").stat().st_mtime_ns
    r = cli("decode", tmp_path / "lat", "-o", tmp_path / "rec", "--model", models["kl"], "--json")
    assert json.loads(r.stdout)["skipped"] == 1 and (tmp_path / "rec" / "odd.png").stat().st_mtime_ns == first
    time.sleep(0.01)
    r = cli("decode", tmp_path / "lat", "-o", tmp_path / "rec", "--model", models["kl"], "--overwrite", "--json")
    assert json.loads(r.stdout)["done"] == 1 and (tmp_path / "rec" / "odd.png").stat().st_mtime_ns != first


# --- options and output -------------------------------------------------------------------------


def test_json_summary_schema(tmp_path, models, images):
    (images / "broken.png").write_bytes(b"\x89PNG nope")
    r = cli("encode", images, "-o", tmp_path / "lat", "--model", models["kl"], "--json")
    assert r.exit_code == 1
    s = json.loads(r.stdout)  # stdout is exactly one JSON object
    assert s["command"] == "encode" and s["output"] == str(tmp_path / "lat")
    assert s["model"]["name"] == "kl.safetensors" and s["model"]["sha256"] == _load_model(models["kl"]).identity()
    assert (s["total"], s["done"], s["skipped"], s["failed"]) == (6, 5, 0, 1)
    assert s["failures"] == [{"path": str(images / "broken.png"), "reason": s["failures"][0]["reason"]}]
    assert isinstance(s["seconds"], float) and s["seconds"] > 0
    assert s["images_per_second"] == pytest.approx(5 / s["seconds"], rel=0.05)
    assert s["device"] == "cpu" and s["dtype"] == "float32" and s["interrupted"] is False


def test_quiet_prints_only_failures(tmp_path, models, images):
    r = cli("encode", images, "-o", tmp_path / "lat", "--model", models["kl"], "--quiet")
    assert r.exit_code == 0 and r.stdout == "" and r.stderr == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (["--device", "cuda:7"], "device 'cuda:7' is not available"),
        (["--device", "tpu"], "tpu"),
        (["--dtype", "float16", "--device", "cpu"], "float16"),
        (["--dtype", "float64"], "float64"),
        (["--model", "no-such-model.safetensors"], "no-such-model.safetensors"),
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path, images, models, args, message):
    r = cli("encode", images, "-o", tmp_path / "lat", *(["--model", models["kl"]] if "--model" not in args else []), *args)
    assert r.exit_code == 2, r.output
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not (tmp_path / "lat").exists()


def test_missing_input_is_a_usage_error(tmp_path, models):
    r = cli("encode", tmp_path / "nope", "-o", tmp_path / "lat", "--model", models["kl"])
    assert r.exit_code == 2 and f"{tmp_path / 'nope'}: no such file or folder" in r.stderr


def test_empty_folder_is_nothing_to_do(tmp_path, models):
    (tmp_path / "empty").mkdir()
    r = cli("encode", tmp_path / "empty", "-o", tmp_path / "lat", "--model", models["kl"])
    assert r.exit_code == 0 and "nothing to do" in r.stdout


@pytest.mark.parametrize("command", ["encode", "decode", "features", "info"])
def test_help_shows_an_example(command):
    r = cli(command, "--help")
    assert r.exit_code == 0
    assert "Examples" in r.stdout and f"vqcli {command} " in r.stdout


# --- the installed command ----------------------------------------------------------------------


def _run(*args, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **kw.pop("env", {})}
    return subprocess.run([VQCLI, *map(str, args)], capture_output=True, text=True, env=env, timeout=300, **kw)


@pytest.mark.slow
def test_installed_command_round_trip_and_exit_codes(tmp_path, models, images):
    assert VQCLI, "the vqcli command is not installed"
    (images / "bad.png").write_text("nope")
    p = _run("encode", images, "-o", tmp_path / "lat", "--model", models["vq"], "--json")
    assert p.returncode == 1
    assert json.loads(p.stdout)["done"] == 5
    assert p.stderr.strip() == f"{images / 'bad.png'}: not an image (or a format Pillow cannot read)"
    p = _run("decode", tmp_path / "lat", "-o", tmp_path / "rec", "--model", models["vq"])
    assert p.returncode == 0, p.stderr
    assert Image.open(tmp_path / "rec" / "sub" / "deep.png").size == (24, 20)
    p = _run("encode", images, "-o", tmp_path / "x", "--device", "cuda:7", "--model", models["vq"])
    assert p.returncode == 2 and "cuda:7" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "vqcli", "info", tmp_path / "lat" / "odd.png.safetensors", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and json.loads(p.stdout)["files"][0]["width"] == 33


PAUSE_AT_FOURTH_WRITE = """
import os, time
_mark = os.environ.get("VQCLI_PAUSE_MARK")
if _mark:
    _real, _calls = os.fsync, [0]
    def _fsync(*a, **k):
        _calls[0] += 1
        if _calls[0] == 4:
            open(_mark, "w").close()
            time.sleep(120)
        return _real(*a, **k)
    os.fsync = _fsync
"""


def _many_images(folder: Path, n: int) -> None:
    for i in range(n):
        _write(folder / f"{i:03d}.png", _photo(64, 64, i))


@pytest.mark.slow
def test_killed_run_leaves_only_complete_files_and_resumes(tmp_path, models):
    """kill -9 in the middle of a run: every file under its final name is complete; the next run
    finishes only what is missing and leaves the finished files untouched."""
    _many_images(tmp_path / "in", 24)
    out = tmp_path / "lat"
    # The kill comes while the run is paused inside its fourth write, its data complete but not yet
    # in place (a hook, not a delay: on a busy machine the run could otherwise finish first).
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(PAUSE_AT_FOURTH_WRITE)
    mark = tmp_path / "paused"
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen(
        [VQCLI, "encode", tmp_path / "in", "-o", out, "--model", models["kl"], "--quiet"],
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "VQCLI_PAUSE_MARK": str(mark)},
    )
    deadline = time.time() + 120
    while time.time() < deadline and not mark.exists() and proc.poll() is None:
        time.sleep(0.02)
    assert mark.exists(), "the run should have paused in its fourth write"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(out.glob("*.png.safetensors"))
    assert len(finished) == 3, "the run should have been killed part-way"
    for f in finished:  # complete and loadable
        latent, meta = _read_latent(f)
        assert latent.shape == (4, 32, 32) and meta["format"] == "vqcli.latent"
    before = _snapshot(out)
    p = _run("encode", tmp_path / "in", "-o", out, "--model", models["kl"], "--json")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["done"] == 24 - len(finished) and s["skipped"] == len(finished)
    after = _snapshot(out)
    assert all(after[k] == before[k] for k in before if not k.startswith(TMP_PREFIX))
    assert len([k for k in after if k.endswith(".png.safetensors")]) == 24


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_with_exit_130(tmp_path, models):
    # Enough images that the run cannot finish between the second output and the signal (with 24
    # tiny images it sometimes did, on an idle machine).
    _many_images(tmp_path / "in", 400)
    out = tmp_path / "lat"
    proc = subprocess.Popen(
        [VQCLI, "encode", tmp_path / "in", "-o", out, "--model", models["kl"], "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        # As in a terminal: a background job of a non-interactive shell (CI) starts with SIGINT
        # ignored, and Python then never raises KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*.png.safetensors"))) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130
    s = json.loads(stdout)
    assert s["interrupted"] is True and s["done"] >= 2
    assert s["done"] == len(list(out.glob("*.png.safetensors")))
    assert not any(p.name.startswith(TMP_PREFIX) for p in out.iterdir())


# --- pipeline pieces ----------------------------------------------------------------------------


def test_batching_holds_back_only_a_few_items():
    """Memory stays flat: with every image a different size, at most a few batches wait for partners."""
    from vqcli.pipeline.batching import Item, batched
    from vqcli.pipeline.results import Job

    consumed = []

    def stream():
        for i in range(1000):
            consumed.append(i)
            job = Job(Path(f"{i}.png"), Path("."), Path(f"{i}.png"), Path(f"o/{i}"))
            yield Item(job, torch.zeros(1), key=(i,), model=None)

    yielded = 0
    for batch in batched(stream(), 4):
        yielded += len(batch)
        assert len(consumed) - yielded <= 4 * 4 + 1
        assert len({item.key for item in batch}) == 1
    assert yielded == 1000


def test_reduced_precision_nan_is_redone_in_float32():
    from vqcli.pipeline.batching import Item, compute
    from vqcli.pipeline.results import Job

    model = AutoEncoder(KL_CONFIG).eval()

    def fn(m, x):  # NaN only when autocast is on: what an fp16 overflow looks like
        y = x * 2
        return torch.full_like(y, float("nan")) if torch.is_autocast_enabled("cpu") else y

    items = [Item(Job(Path(f"{i}"), Path("."), Path(f"{i}"), Path("o")), torch.ones(1, 3, 4, 4) * i, (0,), model) for i in range(2)]
    results = compute(items, fn, torch.bfloat16)
    assert [redone for _, _, redone in results] == [True, True]
    assert torch.equal(results[1][1], torch.full((1, 3, 4, 4), 2.0))
    (_, err, _), = compute(items[:1], lambda m, x: x * float("nan"), torch.float32)
    assert "NaN or infinite" in str(err)


def test_bfloat16_encode_is_close_to_float32(tmp_path, models, images):
    assert cli("encode", images / "odd.png", "-o", tmp_path / "f32", "--model", models["kl"]).exit_code == 0
    r = cli("encode", images / "odd.png", "-o", tmp_path / "bf16", "--model", models["kl"], "--dtype", "bfloat16", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["dtype"] == "bfloat16"
    a, _ = _read_latent(tmp_path / "f32" / "odd.png.safetensors")
    b, meta = _read_latent(tmp_path / "bf16" / "odd.png.safetensors")
    assert b.dtype == torch.float32 and meta["dtype"] == "float32"
    assert 0 < (a - b).abs().max() < 0.1


def test_walk_skips_temporary_files_output_folder_and_link_loops(tmp_path, models):
    root = tmp_path / "in"
    _write(root / "a.png", _photo(8, 8, 1))
    _write(root / "sub" / "b.png", _photo(8, 8, 2))
    (root / f"{TMP_PREFIX}abc.png").write_bytes(b"half-written")
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    out = root / "latents"  # the output inside the input
    assert cli("encode", root, "-o", out, "--model", models["kl"]).exit_code == 0
    _write(out / "decoy.png", _photo(8, 8, 3))  # an image inside the output folder is not an input
    r = cli("encode", root, "-o", out, "--model", models["kl"], "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert (s["total"], s["skipped"], s["failed"]) == (2, 2, 0)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.safetensors")) == [
        "a.png.safetensors",
        "sub/b.png.safetensors",
    ]


def test_output_that_is_a_file_is_a_usage_error(tmp_path, models, images):
    (tmp_path / "file").write_text("x")
    r = cli("encode", images, "-o", tmp_path / "file", "--model", models["kl"])
    assert r.exit_code == 2 and "the output must be a folder" in r.stderr


def test_a_file_named_twice_is_done_once(tmp_path, models, images):
    r = cli("encode", images, images / "odd.png", "-o", tmp_path / "lat", "--model", models["kl"], "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["total"] == 5


def test_latent_of_a_copy_of_an_embedded_model_decodes_without_model(tmp_path, models, images):
    """Encoded with --model PATH where PATH holds an embedded model's weights: the recorded hash is
    the embedded model's, so decode finds it; another file's latents still need --model."""
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(models["kl"], weights / "default.safetensors")
    shutil.copy(models["vq"], weights / "default-vq.safetensors")
    env = {"VQCLI_WEIGHTS_DIR": str(weights)}
    copy = shutil.copy(models["vq"], tmp_path / "my-copy.safetensors")
    assert cli("encode", images / "odd.png", "-o", tmp_path / "lat", "--model", copy, env=env).exit_code == 0
    assert cli("encode", images / "odd.png", "-o", tmp_path / "ref", "--model", "default-vq", env=env).exit_code == 0
    r = cli("decode", tmp_path / "lat", "-o", tmp_path / "rec", env=env)
    assert r.exit_code == 0, r.output
    r = cli("decode", tmp_path / "ref", "-o", tmp_path / "rec_ref", env=env)
    assert r.exit_code == 0, r.output
    a, b = (np.asarray(Image.open(p / "odd.png")) for p in (tmp_path / "rec", tmp_path / "rec_ref"))
    assert a.shape == (17, 33, 3) and np.array_equal(a, b)
    other = shutil.copy(models["kl_other"], tmp_path / "other.safetensors")
    assert cli("encode", images / "odd.png", "-o", tmp_path / "lat2", "--model", other, env=env).exit_code == 0
    r = cli("decode", tmp_path / "lat2", "-o", tmp_path / "rec2", env=env)
    assert r.exit_code == 1 and "made by the model file 'other.safetensors'" in r.stderr
