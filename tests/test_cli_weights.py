"""Users' weights through the installed command: `vqcli encode` / `vqcli decode --model CHECKPOINT`
give what diffusers computes with the same weights, whatever format the weights came in."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_checkpoints import (  # noqa: F401 - kl and vq are fixtures
    kl,
    vq,
    write_diffusers_folder,
    write_full_sd_ckpt,
    write_original_safetensors,
    write_taming_ckpt,
)

from vqcli.io.images import load_image
from vqcli.io.padding import pad_to_multiple, to_model_input


def run_vqcli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "vqcli"
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "vqcli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=600)


def _photo(tmp_path: Path, height: int = 30, width: int = 44) -> Path:
    """A crop of a real photograph, not a multiple of the downsampling factor (padding included)."""
    rgb = np.asarray(Image.open(Path(__file__).resolve().parents[1] / "sample_images" / "coffee.png").convert("RGB"))
    path = tmp_path / "photo.png"
    Image.fromarray(rgb[100 : 100 + height, 200 : 200 + width]).save(path)
    return path


def _round_trip(tmp_path: Path, model: Path) -> tuple[Path, Path]:
    photo = _photo(tmp_path)
    done = run_vqcli("encode", str(photo), "-o", str(tmp_path / "lat"), "--model", str(model))
    assert done.returncode == 0, done.stderr
    done = run_vqcli("decode", str(tmp_path / "lat"), "-o", str(tmp_path / "rec"), "--model", str(model))
    assert done.returncode == 0, done.stderr
    return photo, tmp_path / "lat" / "photo.png.safetensors"


def _expected_image(decoded: torch.Tensor, height: int, width: int) -> np.ndarray:
    y = decoded[0, :, :height, :width].clamp(-1, 1)
    return ((y + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("writer", [write_diffusers_folder, write_full_sd_ckpt, write_original_safetensors])
def test_kl_checkpoints_through_the_command_match_diffusers(writer, kl, tmp_path):  # noqa: F811
    model = writer(tmp_path, kl)
    photo, latent_file = _round_trip(tmp_path, model)
    f = 2 ** (len(kl.config.ch_mult) - 1)
    x = pad_to_multiple(to_model_input(load_image(photo)), f)
    with torch.no_grad():
        mean = kl.dmodel.encode(x).latent_dist.mode()
        decoded = kl.dmodel.decode(mean).sample
    latent = load_file(latent_file)["latent"]
    assert (latent - mean[0]).abs().max().item() <= 1e-4
    back = np.asarray(Image.open(tmp_path / "rec" / "photo.png").convert("RGB"))
    expected = _expected_image(decoded, *back.shape[:2])
    assert back.shape[:2] == (30, 44)
    assert np.abs(back.astype(int) - expected.astype(int)).max() <= 1  # float rounding at an 8-bit boundary


@pytest.mark.slow
def test_taming_vqgan_through_the_command_gives_diffusers_indices(vq, tmp_path):  # noqa: F811
    model = write_taming_ckpt(tmp_path, vq)
    photo, latent_file = _round_trip(tmp_path, model)
    f = 2 ** (len(vq.config.ch_mult) - 1)
    x = pad_to_multiple(to_model_input(load_image(photo)), f)
    with torch.no_grad():
        h = vq.dmodel.encode(x).latents
        codes, _, (_, _, flat) = vq.dmodel.quantize(h)
        decoded = vq.dmodel.decode(h).sample
    indices = load_file(latent_file)["latent"]
    assert torch.equal(indices.long(), flat.reshape(h.shape[2], h.shape[3]))
    back = np.asarray(Image.open(tmp_path / "rec" / "photo.png").convert("RGB"))
    assert np.abs(back.astype(int) - _expected_image(decoded, *back.shape[:2]).astype(int)).max() <= 1
