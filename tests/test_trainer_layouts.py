"""``--layout kohya`` and ``--layout comfyui``: files with the names, keys, shapes and dtypes those
tools' loaders read, and ``decode`` reading them back to the same images.

Written from their public source:

* kohya-ss/sd-scripts, ``library/strategy_base.py`` (``LatentsCachingStrategy``:
  ``_default_load_latents_from_disk`` reads ``latents``, ``original_size``, ``crop_ltrb`` and
  ``latents_flipped``, each with the suffix ``_{H//stride}x{W//stride}`` when several resolutions
  are cached) and ``library/train_util.py`` (the classic cache: the image's name with ``.npz``,
  the same keys without suffix; ``original_size`` is (width, height), ``crop_ltrb`` left, top,
  right, bottom; arrays read with ``np.load``);
* comfyanonymous/ComfyUI, ``nodes.py`` (``LoadLatent``: ``safetensors.torch.load_file``, then
  ``latent["latent_tensor"].float()``, divided by 0.18215 unless ``latent_format_version_0`` is in
  the file; ``SaveLatent`` writes the latent batch (B, C, h, w) and that empty marker).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from vqcli import AutoEncoder, AutoEncoderConfig
from vqcli.checkpoints.native import save_native
from vqcli.cli import app

CONFIG = AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)  # f2
SAMPLES = Path(__file__).resolve().parents[1] / "sample_images"
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """One photograph (60 x 40) encoded at 32 x 32 with --flip in all three layouts."""
    root = tmp_path_factory.mktemp("layouts")
    torch.manual_seed(0)
    model = root / "kl.safetensors"
    save_native(AutoEncoder(CONFIG), model)
    rgb = np.asarray(Image.open(SAMPLES / "coffee.png").convert("RGB"))[100:140, 200:260]
    (root / "in").mkdir()
    Image.fromarray(rgb).save(root / "in" / "cup.png")
    for layout in ("vqcli", "kohya", "comfyui"):
        r = cli("encode", root / "in", "-o", root / layout, "--model", model, "--resolution", 32, "--flip", "--layout", layout)
        assert r.exit_code == 0, r.output
    with safe_open(str(root / "vqcli" / "cup.png.safetensors"), "pt") as f:
        reference = {k: f.get_tensor(k) for k in f.keys()}
    return root, model, reference


def test_kohya_cache_has_what_sd_scripts_reads(encoded):
    root, _, reference = encoded
    assert [p.name for p in (root / "kohya").iterdir()] == ["cup.npz"]  # the image's name, .npz
    npz = np.load(root / "kohya" / "cup.npz")  # (sd-scripts' np.load: no pickle needed)
    latents = npz["latents"]
    assert latents.dtype == np.float32 and latents.shape == (4, 16, 16)  # (C, H/8-like, W/...) no batch axis
    np.testing.assert_array_equal(latents, reference["latent"].numpy())
    np.testing.assert_array_equal(npz["latents_flipped"], reference["latent_flipped"].numpy())
    # 60 x 40 -> short side 32: 48 x 32, centred crop of 32 columns from 8
    assert npz["original_size"].tolist() == [60, 40]  # width, height
    assert npz["crop_ltrb"].tolist() == [8, 0, 40, 32]
    suffix = "_16x16"  # the strategy loader's key for a 32 x 32 bucket at stride 2: H//2 x W//2
    for key in ("latents", "original_size", "crop_ltrb", "latents_flipped"):
        np.testing.assert_array_equal(npz[key + suffix], npz[key])


def test_comfyui_latent_loads_as_load_latent_does(encoded):
    root, _, reference = encoded
    assert [p.name for p in (root / "comfyui").iterdir()] == ["cup.png.latent"]
    latent = safetensors.torch.load_file(str(root / "comfyui" / "cup.png.latent"), device="cpu")
    assert "latent_format_version_0" in latent  # so no 1/0.18215 rescaling
    samples = latent["latent_tensor"].float()
    assert samples.shape == (1, 4, 16, 16) and latent["latent_tensor"].dtype == torch.float32
    assert torch.equal(samples[0], reference["latent"])


def test_decode_reads_all_three_layouts_to_the_same_image(encoded, tmp_path):
    root, model, _ = encoded
    images = {}
    for layout, name in [("vqcli", "cup.png"), ("kohya", "cup.png"), ("comfyui", "cup.png")]:
        r = cli("decode", root / layout, "-o", tmp_path / layout, "--model", model)
        assert r.exit_code == 0, r.output
        images[layout] = np.asarray(Image.open(tmp_path / layout / name))
    assert images["vqcli"].shape == (32, 32, 3)
    assert np.array_equal(images["vqcli"], images["kohya"]) and np.array_equal(images["vqcli"], images["comfyui"])
    r = cli("stats", root / "kohya", root / "comfyui", "--json")
    assert r.exit_code == 0 and '"files": 2' in r.stdout


def test_layout_refusals_and_resume(encoded, tmp_path):
    root, model, _ = encoded
    r = cli("encode", root / "in", "-o", tmp_path / "c", "--model", model, "--layout", "comfyui", "--scaled")
    assert r.exit_code == 2 and "ComfyUI scales them itself" in r.stderr
    r = cli("encode", root / "in", "-o", tmp_path / "k", "--model", model, "--layout", "kohya", "--latent-dtype", "bfloat16")
    assert r.exit_code == 2 and "no bfloat16" in r.stderr
    # resume recognises its own .npz, and reports one made with other options
    args = ["encode", root / "in", "-o", root / "kohya", "--model", model, "--layout", "kohya", "--flip"]
    r = cli(*args, "--resolution", 32, "--json")
    assert r.exit_code == 0 and '"skipped": 1' in r.stdout
    r = cli(*args, "--resolution", 24)
    assert r.exit_code == 1 and "exists, made with other options" in r.stderr


def test_info_describes_every_layout(encoded):
    import json

    root, _, _ = encoded
    for path in (root / "vqcli" / "cup.png.safetensors", root / "kohya" / "cup.npz", root / "comfyui" / "cup.png.latent"):
        r = cli("info", path, "--json")
        assert r.exit_code == 0, r.output
        body = json.loads(r.stdout)
        (described,) = body["files"] if "files" in body else [body]
        assert described["type"] == "latent" and described["extra_tensors"] == ["latent_flipped"]
        assert described["original_size"] == "40,60" and described["target_size"] == "32,32"
