"""``vqcli features``: every layer's map, as saved tensors, pictures, a table and JSON.

Oracle: the Encoder's and Decoder's own forward_with_features_output, called directly.
"""

from __future__ import annotations

import json
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
from vqcli.io.padding import pad_to_multiple, to_model_input
from vqcli.pipeline.features import (
    extract_features,
    layer_grid,
    most_active_channels,
    overview,
    select_layers,
)

SAMPLES = Path(__file__).resolve().parents[1] / "sample_images"
runner = CliRunner()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "kl.safetensors"
    save_native(AutoEncoder(AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)), path)
    return path


@pytest.fixture
def image(tmp_path) -> Path:
    rgb = np.asarray(Image.open(SAMPLES / "coffee.png").convert("RGB"))[100:123, 200:241]  # 23x41
    Image.fromarray(rgb).save(tmp_path / "coffee crop.png")
    return tmp_path / "coffee crop.png"


def _oracle(model: AutoEncoder, image: Path) -> dict[str, torch.Tensor]:
    rgb = np.asarray(Image.open(image).convert("RGB"), dtype=np.float32) / 255
    x = pad_to_multiple(to_model_input(rgb), 2)
    with torch.no_grad():
        h, enc = model.encoder.forward_with_features_output(x)
        z = model.quant_conv(h)[:, :4]  # the mean
        _, dec = model.decoder.forward_with_features_output(model.post_quant_conv(z))
    return {**{f"encoder.{k}": v[0] for k, v in enc.items()}, **{f"decoder.{k}": v[0] for k, v in dec.items()}}


def test_features_file_holds_every_layer(tmp_path, model_path, image):
    out = tmp_path / "feats"
    r = runner.invoke(app, ["features", str(image), "-o", str(out), "--model", str(model_path), "--json"])
    assert r.exit_code == 0, r.output
    model = load_native(model_path).eval()
    expected = _oracle(model, image)
    with safe_open(str(out / "features.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert set(keys) == set(expected)
        for k in expected:
            torch.testing.assert_close(f.get_tensor(k), expected[k], atol=1e-5, rtol=1e-5)
        assert f.metadata()["width"] == "41" and f.metadata()["model_sha256"] == model.identity()
    assert "encoder.conv_in" in keys and "decoder.up1_block0" in keys and "encoder.down0_downsample" in keys
    summary = json.loads(r.stdout)
    assert [row["layer"] for row in summary["layers"]] == list(expected)  # execution order
    for row in summary["layers"]:
        t = expected[row["layer"]]
        assert row["shape"] == list(t.shape)
        assert row["mean"] == pytest.approx(float(t.mean()), abs=1e-5)
        assert row["std"] == pytest.approx(float(t.std(unbiased=False)), abs=1e-5)
        assert (row["min"], row["max"]) == (pytest.approx(float(t.min()), abs=1e-5), pytest.approx(float(t.max()), abs=1e-5))
        png = Path(row["png"])
        assert png.parent == out / "layers" and png.name == f"{row['layer']}.png"
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width > 0
    with Image.open(out / "overview.png") as im:
        assert im.format == "PNG"


def test_table_dtype_and_layer_filter(tmp_path, model_path, image):
    args = ["features", str(image), "--model", str(model_path)]
    r = runner.invoke(app, [*args, "-o", str(tmp_path / "all")])
    assert r.exit_code == 0, r.output
    for word in ("layer", "shape", "mean", "std", "min", "max", "encoder.conv_in", "decoder.conv_out"):
        assert word in r.stdout
    r = runner.invoke(app, [*args, "-o", str(tmp_path / "half"), "--save-dtype", "float16", "--layers", "down*", "--layers", "decoder.mid*"])
    assert r.exit_code == 0, r.output
    with safe_open(str(tmp_path / "half" / "features.safetensors"), "pt") as f:
        keys = sorted(f.keys())
        assert all(f.get_tensor(k).dtype == torch.float16 for k in keys)
    assert keys == sorted(["encoder.down0_block0", "encoder.down0_downsample", "encoder.down1_block0",
                           "decoder.mid_block_1", "decoder.mid_attn_1", "decoder.mid_block_2"])
    assert sorted(p.stem for p in (tmp_path / "half" / "layers").iterdir()) == keys
    with safe_open(str(tmp_path / "all" / "features.safetensors"), "pt") as f:
        full = sum(f.get_tensor(k).numel() * 4 for k in keys)
    half_size = (tmp_path / "half" / "features.safetensors").stat().st_size
    assert half_size < full * 0.5 + 4096  # half the bytes of the same layers in float32 (+ header)


def test_no_matching_layer_and_existing_output(tmp_path, model_path, image):
    args = ["features", str(image), "--model", str(model_path), "-o", str(tmp_path / "f")]
    r = runner.invoke(app, [*args, "--layers", "nothing*"])
    assert r.exit_code == 2 and "no layer matches nothing*" in r.stderr
    assert runner.invoke(app, [*args, "-q"]).exit_code == 0
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and "already exists" in r.stderr
    assert runner.invoke(app, [*args, "--overwrite", "-q"]).exit_code == 0
    (tmp_path / "bad.png").write_bytes(b"nope")
    r = runner.invoke(app, ["features", str(tmp_path / "bad.png"), "--model", str(model_path), "-o", str(tmp_path / "g")])
    assert r.exit_code == 1 and f"{tmp_path / 'bad.png'}: not an image" in r.stderr


def test_default_output_folder(tmp_path, model_path, image, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["features", str(image), "--model", str(model_path), "--layers", "conv_in", "-q"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "coffee crop.png.features" / "features.safetensors").is_file()


def test_most_active_channels_and_grid():
    t = torch.zeros(6, 4, 5)
    t[4] = -3.0  # largest mean |activation|
    t[1] = 2.0
    t[5, 0, 0] = 1.0
    assert most_active_channels(t, 3) == [4, 1, 5]
    assert most_active_channels(t, 10)[:3] == [4, 1, 5] and len(most_active_channels(t, 10)) == 6
    grid = layer_grid("x", t, channels=3, tile=20)
    assert grid.mode == "RGB" and grid.width >= 3 * 20
    tiles = overview({"encoder.a": t, "decoder.b": t[:2]}, tile=16)
    assert tiles.width >= 2 * 16


def test_extract_features_selects_by_bare_and_full_names(model_path):
    model = load_native(model_path).eval()
    maps = extract_features(model, np.full((5, 9, 3), 0.5, dtype=np.float32))
    assert list(select_layers(maps, ["conv_in"])) == ["encoder.conv_in", "decoder.conv_in"]
    assert list(select_layers(maps, ["encoder.conv_*"])) == ["encoder.conv_in", "encoder.conv_out"]
    assert maps["encoder.conv_in"].shape == (32, 6, 10)  # padded to the factor 2
