"""The Python API (``vqcli.load``, ``encode_image``, ``decode_latent``, ``read_latent``,
``write_latent``): the README's example runs, and its numbers are the CLI's bit for bit."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import vqcli
from vqcli import AutoEncoder, AutoEncoderConfig
from vqcli.checkpoints.native import save_native
from vqcli.cli import app
from vqcli.errors import FileError, UsageError

REPO = Path(__file__).resolve().parents[1]
KL = AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)
VQ = AutoEncoderConfig(kind="vq", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, n_embed=64)


def _photo(path: Path, height: int, width: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _weights(path: Path, config: AutoEncoderConfig, seed: int) -> Path:
    torch.manual_seed(seed)
    model = AutoEncoder(config)
    if config.kind == "vq":
        with torch.no_grad():
            model.quantize.embedding.weight.normal_(0, 0.3)
    save_native(model, path)
    return path


def _readme_example() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README.md's Python API section has no python example"
    return match.group(1)


def test_readme_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _photo(tmp_path / "photo.jpg", 37, 45)
    exec(compile(_readme_example(), "README.md", "exec"), {})
    latent = vqcli.read_latent(tmp_path / "photo.jpg.safetensors")
    assert (latent.meta.width, latent.meta.height) == (45, 37)
    with Image.open(tmp_path / "photo-recon.png") as im:
        assert im.size == (45, 37)


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_api_equals_cli_encode_then_decode_bit_for_bit(tmp_path, kind):
    weights = _weights(tmp_path / f"{kind}.safetensors", KL if kind == "kl" else VQ, 3)
    (tmp_path / "in").mkdir()
    image = _photo(tmp_path / "in" / "a.png", 29, 34)
    runner = CliRunner()
    r = runner.invoke(app, ["encode", str(image), "-o", str(tmp_path / "lat"), "--model", str(weights), "--device", "cpu", "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["decode", str(tmp_path / "lat"), "-o", str(tmp_path / "rec"), "--model", str(weights), "--device", "cpu", "-q"])
    assert r.exit_code == 0, r.output
    cli_latent = vqcli.read_latent(tmp_path / "lat" / "a.png.safetensors")
    with Image.open(tmp_path / "rec" / "a.png") as im:
        cli_image = np.asarray(im.convert("RGB"))

    model = vqcli.load(str(weights))
    pixels = np.asarray(Image.open(image).convert("RGB"))
    for given in (image, Image.open(image), pixels):  # a path, a PIL image, a numpy array
        latent = model.encode_image(given)
        assert latent.tensor.dtype == cli_latent.tensor.dtype
        assert torch.equal(latent.tensor, cli_latent.tensor)
        assert latent.meta.model_sha256 == cli_latent.meta.model_sha256
        assert (latent.meta.width, latent.meta.height) == (34, 29)
        decoded = model.decode_latent(latent)
        assert decoded.size == (34, 29)
        assert np.array_equal(np.asarray(decoded), cli_image)
    # the CLI's latent file, read by the API, decodes to the CLI's image
    assert np.array_equal(np.asarray(model.decode_latent(vqcli.read_latent(tmp_path / "lat" / "a.png.safetensors"))), cli_image)
    # and the API's file is one the CLI decodes
    vqcli.write_latent(tmp_path / "api" / "a.png.safetensors", model.encode_image(image))
    r = runner.invoke(app, ["decode", str(tmp_path / "api"), "-o", str(tmp_path / "rec2"), "--model", str(weights), "-q"])
    assert r.exit_code == 0, r.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "rec2" / "a.png").convert("RGB")), cli_image)


def test_errors_are_one_line_exceptions(tmp_path):
    weights = _weights(tmp_path / "kl.safetensors", KL, 0)
    other = _weights(tmp_path / "other.safetensors", KL, 1)
    with pytest.raises(UsageError, match="no such file, and not an embedded model"):
        vqcli.load(str(tmp_path / "missing.safetensors"))
    model = vqcli.load(str(weights))
    with pytest.raises(FileError, match="no such file"):
        model.encode_image(tmp_path / "nothing.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(FileError, match="bad.png: not an image"):
        model.encode_image(tmp_path / "bad.png")
    with pytest.raises(UsageError, match=r"\(H, W, 3\)"):
        model.encode_image(np.zeros((4, 4, 5), np.uint8))
    latent = model.encode_image(np.full((9, 11, 3), 0.5, np.float32))
    with pytest.raises(FileError, match="decode it with the model that encoded it"):
        vqcli.load(str(other)).decode_latent(latent)
    vqcli.write_latent(tmp_path / "x.safetensors", latent)
    with pytest.raises(FileExistsError):
        vqcli.write_latent(tmp_path / "x.safetensors", latent)
