"""Latents for training sets: resize and crop, aspect-ratio buckets, flips, the posterior and the
stored dtype, checked against Pillow and the model's own moments computed here."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from vqcli import AutoEncoder, AutoEncoderConfig
from vqcli.checkpoints.native import save_native
from vqcli.cli import app
from vqcli.io.geometry import Fit, apply, place

# f2 (ch_mult of two levels), so bucket sides are multiples of 16
CONFIG = AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)
SAMPLES = Path(__file__).resolve().parents[1] / "sample_images"
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def kl(tmp_path_factory) -> tuple[Path, AutoEncoder]:
    torch.manual_seed(0)
    model = AutoEncoder(CONFIG).eval()
    path = tmp_path_factory.mktemp("train-model") / "kl.safetensors"
    save_native(model, path)
    return path, model


def _photo(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """A ``width`` x ``height`` crop of a sample photograph, saved as PNG."""
    rgb = np.asarray(Image.open(SAMPLES / "coffee.png").convert("RGB"))
    y, x = (seed * 37) % (rgb.shape[0] - height), (seed * 53) % (rgb.shape[1] - width)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb[y : y + height, x : x + width]).save(path)
    return path


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _pair(text: str) -> tuple[int, int]:
    a, b = text.split(",")
    return int(a), int(b)


def _model_input(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) [0, 1] to (1, 3, H, W) [-1, 1], mirrored on the right and bottom to a multiple of 2."""
    x = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None] * 2 - 1
    h, w = x.shape[-2:]
    return F.pad(x, (0, w % 2, 0, h % 2), mode="reflect")


def _moments(model: AutoEncoder, rgb: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        mean, logvar = model.encode_moments(_model_input(rgb)).chunk(2, dim=1)
    return mean[0], logvar[0].clamp(-30, 20)


def test_resize_and_center_crop_match_pillow():
    """Resize to cover the target keeping the aspect ratio (LANCZOS), then a centred crop."""
    src = np.asarray(Image.open(SAMPLES / "coffee.png").convert("RGB"))[:150, :200]  # 200 x 150
    fit = Fit("size", 96, 40)
    p = place(200, 150, fit)
    # by hand: 96/200 = 0.48 and 40/150 = 0.27: the width decides, 200x150 -> 96x72, crop 40 rows at 16
    assert p.resized == (72, 96) and p.crop_top_left == (16, 0) and p.target_size == (40, 96)
    assert p.crop_ltrb == (0, 16, 96, 56)
    ours = apply(src.astype(np.float32) / 255, p)
    pillow = np.asarray(Image.fromarray(src).resize((96, 72), Image.LANCZOS))[16:56].astype(np.float32) / 255
    assert ours.shape == pillow.shape == (40, 96, 3)
    # Pillow's 8-bit resize rounds after each of its two passes: within 1.5 steps, 0.5 on average
    assert np.abs(ours - pillow).max() <= 1.5 / 255 and np.abs(ours - pillow).mean() < 0.5 / 255
    # resized once: not the same as two steps through a half size
    twice = np.asarray(Image.fromarray(src).resize((100, 75), Image.LANCZOS).resize((96, 72), Image.LANCZOS))
    assert np.abs(ours - twice[16:56] / 255).max() > 2.0 / 255


def test_sdxl_buckets():
    buckets = Fit("buckets", 1024, 1024, step=64).buckets()
    for b in [(1024, 1024), (896, 1152), (1152, 896), (832, 1216), (1216, 832), (768, 1344), (1344, 768)]:
        assert b in buckets  # the SDXL buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 1024 * 1024 for w, h in buckets)
    assert all(max(w / h, h / w) <= 4 for w, h in buckets)
    assert {(h, w) for w, h in buckets} == set(buckets)  # portrait and landscape alike


BUCKET_CASES = [  # image (W, H), its bucket (W, H), resized (H, W), crop (top, left)
    ((120, 30), (64, 16), (16, 64), (0, 0)),  # 4:1
    ((30, 30), (32, 32), (32, 32), (0, 0)),  # square, enlarged
    ((20, 90), (16, 64), (72, 16), (4, 0)),  # 1:4.5 -> 1:4, cropped top and bottom
    ((50, 40), (32, 32), (32, 40), (0, 4)),  # 1.25:1 -> square
]


def test_buckets_through_encode(tmp_path, kl):
    path, model = kl
    for i, (size, *_) in enumerate(BUCKET_CASES):
        _photo(tmp_path / "in" / f"x{i}.png", *size, seed=i)
    r = cli("encode", tmp_path / "in", "-o", tmp_path / "lat", "--model", path, "--resolution", 32, "--buckets")
    assert r.exit_code == 0, r.output
    for i, (size, bucket, resized, crop) in enumerate(BUCKET_CASES):
        tensors, meta = _read(tmp_path / "lat" / f"x{i}.png.safetensors")
        w, h = bucket
        assert meta["bucket"] == "true" and _pair(meta["target_size"]) == (h, w)
        assert (int(meta["width"]), int(meta["height"])) == (w, h)
        assert _pair(meta["original_size"]) == (size[1], size[0]) and _pair(meta["crop_top_left"]) == crop
        assert tuple(tensors["latent"].shape) == (4, h // 2, w // 2)
        # the latent is that of Pillow's resize and crop (to its 8-bit rounding)
        src = Image.open(tmp_path / "in" / f"x{i}.png").convert("RGB")
        top, left = crop
        pillow = np.asarray(src.resize(resized[::-1], Image.LANCZOS))[top : top + h, left : left + w] / 255
        expected, _ = _moments(model, pillow)
        error = (tensors["latent"] - expected).abs()
        assert error.mean() < 0.01 and error.max() < 0.08, (float(error.mean()), float(error.max()))


def test_random_crop_is_the_same_from_two_shards(tmp_path, kl):
    path, _ = kl
    for i in range(4):
        _photo(tmp_path / "in" / f"p{i}.png", 40 + 7 * i, 30 + 5 * i, seed=i)
    common = ["--model", path, "--size", "24x24", "--crop", "random", "--seed", 5]
    assert cli("encode", tmp_path / "in", "-o", tmp_path / "whole", *common).exit_code == 0
    for shard in ("0/2", "1/2"):
        assert cli("encode", tmp_path / "in", "-o", tmp_path / "shards", *common, "--shard", shard).exit_code == 0
    crops = {}
    for i in range(4):
        name = f"p{i}.png.safetensors"
        whole, meta = _read(tmp_path / "whole" / name)
        parts, meta2 = _read(tmp_path / "shards" / name)
        assert meta["crop_top_left"] == meta2["crop_top_left"] and torch.equal(whole["latent"], parts["latent"])
        crops[i] = _pair(meta["crop_top_left"])
    # the centred crops, by hand: the short side (the height) becomes 24
    centred = {i: (0, (round((40 + 7 * i) * 24 / (30 + 5 * i)) - 24) // 2) for i in range(4)}
    assert crops != centred and len(set(crops.values())) > 1  # drawn per image, not one crop for all
    r = cli("encode", tmp_path / "in", "-o", tmp_path / "other", *common[:-1], 6)
    assert r.exit_code == 0
    other = {i: _pair(_read(tmp_path / "other" / f"p{i}.png.safetensors")[1]["crop_top_left"]) for i in range(4)}
    assert other != crops


def test_flip_posterior_and_stored_dtype(tmp_path, kl):
    path, model = kl
    _photo(tmp_path / "in" / "odd.png", 33, 17)  # odd sides: each of the two images padded on its own
    r = cli("encode", tmp_path / "in", "-o", tmp_path / "lat", "--model", path, "--flip", "--posterior")
    assert r.exit_code == 0, r.output
    tensors, meta = _read(tmp_path / "lat" / "odd.png.safetensors")
    assert set(tensors) == {"latent", "latent_logvar", "latent_flipped", "latent_flipped_logvar"}
    rgb = np.asarray(Image.open(tmp_path / "in" / "odd.png").convert("RGB")) / 255
    mean, logvar = _moments(model, rgb)
    fmean, flogvar = _moments(model, rgb[:, ::-1])
    for name, want in [("latent", mean), ("latent_logvar", logvar), ("latent_flipped", fmean), ("latent_flipped_logvar", flogvar)]:
        assert tensors[name].dtype == torch.float32
        assert torch.allclose(tensors[name], want, atol=1e-5), name
    assert not torch.allclose(tensors["latent_flipped"], mean.flip(-1), atol=1e-3)  # padded as an image of its own

    # scaled: the distribution of (z - shift) * scale
    r = cli("encode", tmp_path / "in", "-o", tmp_path / "s", "--model", path, "--posterior", "--scaled", "--scale-factor", 0.5, "--shift-factor", 0.1)
    assert r.exit_code == 0, r.output
    tensors, _ = _read(tmp_path / "s" / "odd.png.safetensors")
    assert torch.allclose(tensors["latent"], (mean - 0.1) * 0.5, atol=1e-5)
    assert torch.allclose(tensors["latent_logvar"], logvar + 2 * math.log(0.5), atol=1e-5)

    for name, dtype in [("float16", torch.float16), ("bfloat16", torch.bfloat16)]:
        out = tmp_path / name
        assert cli("encode", tmp_path / "in", "-o", out, "--model", path, "--flip", "--latent-dtype", name).exit_code == 0
        tensors, meta = _read(out / "odd.png.safetensors")
        assert meta["dtype"] == name and {t.dtype for t in tensors.values()} == {dtype}
        assert torch.allclose(tensors["latent"].float(), mean, atol=0.02)
        # decode reads it back
        r = cli("decode", out, "-o", tmp_path / f"rec-{name}", "--model", path)
        assert r.exit_code == 0, r.output
        assert Image.open(tmp_path / f"rec-{name}" / "odd.png").size == (33, 17)


def test_changing_a_training_option_makes_the_latents_stale(tmp_path, kl):
    path, _ = kl
    _photo(tmp_path / "in" / "a.png", 40, 30)
    assert cli("encode", tmp_path / "in", "-o", tmp_path / "lat", "--model", path, "--resolution", 16).exit_code == 0
    for extra in (["--resolution", 24], ["--resolution", 16, "--flip"], ["--resolution", 16, "--crop", "random"]):
        r = cli("encode", tmp_path / "in", "-o", tmp_path / "lat", "--model", path, *extra)
        assert r.exit_code == 1 and "exists, made with other options" in r.stderr
    assert cli("encode", tmp_path / "in", "-o", tmp_path / "lat", "--model", path, "--resolution", 16).exit_code == 0


def test_bad_training_options_are_usage_errors(tmp_path, kl):
    path, _ = kl
    _photo(tmp_path / "in" / "a.png", 20, 20)
    for args, words in [
        (["--size", "12by3"], "--size"),
        (["--buckets"], "--resolution"),
        (["--crop", "left"], "--crop"),
        (["--latent-dtype", "int8"], "--latent-dtype"),
        (["--resolution", 16, "--size", "8x8"], "not both"),
    ]:
        r = cli("encode", tmp_path / "in", "-o", tmp_path / "lat", "--model", path, *args)
        assert r.exit_code == 2 and words in r.stderr, (args, r.stderr)
    assert not (tmp_path / "lat").exists()
