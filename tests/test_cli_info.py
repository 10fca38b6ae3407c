"""``vqcli info``: latent files, weights files and other safetensors files described; failures named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from vqcli import AutoEncoder, AutoEncoderConfig
from vqcli.checkpoints.native import load_native, save_native
from vqcli.cli import app

runner = CliRunner()
KL = AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, name="tiny")
VQ = AutoEncoderConfig(kind="vq", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, n_embed=64)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("info")
    torch.manual_seed(0)
    kl, vq = AutoEncoder(KL), AutoEncoder(VQ)
    save_native(kl, d / "kl.safetensors")
    save_native(vq, d / "vq.safetensors")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (17, 33, 3), dtype=np.uint8)).save(d / "img.png")
    for name, model in (("lat", d / "kl.safetensors"), ("latvq", d / "vq.safetensors")):
        r = runner.invoke(app, ["encode", str(d / "img.png"), "-o", str(d / name), "--model", str(model), "-q"])
        assert r.exit_code == 0, r.output
    save_file({"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.float16)}, str(d / "other.safetensors"),
              metadata={"hello": "world"})
    return {
        "kl": d / "kl.safetensors",
        "vq": d / "vq.safetensors",
        "latent": d / "lat" / "img.png.safetensors",
        "latent_vq": d / "latvq" / "img.png.safetensors",
        "other": d / "other.safetensors",
        "sha_kl": kl.identity(),
    }


def test_latent_file(files):
    r = runner.invoke(app, ["info", str(files["latent"]), "--json"])
    assert r.exit_code == 0, r.output
    (d,) = json.loads(r.stdout)["files"]
    assert d["type"] == "latent" and d["file"] == str(files["latent"])
    assert (d["width"], d["height"], d["padded_width"], d["padded_height"], d["padding"]) == (33, 17, 34, 18, [1, 1])
    assert d["model"] == "kl.safetensors" and d["model_embedded"] is False and d["model_sha256"] == files["sha_kl"]
    assert d["config"]["ch_mult"] == [1, 2] and d["kind"] == "kl" and d["representation"] == "mean"
    assert d["tensor"] == {"name": "latent", "shape": [4, 9, 17], "dtype": "float32"}
    assert d["scaled"] is False and d["scale_factor"] == 1.0 and d["source"] == "img.png"
    from safetensors import safe_open

    with safe_open(str(files["latent"]), "pt") as f:
        z = f.get_tensor("latent")
    assert d["stats"]["mean"] == pytest.approx(float(z.mean()), abs=1e-6)
    assert d["stats"]["max"] == pytest.approx(float(z.max()), abs=1e-6)

    r = runner.invoke(app, ["info", str(files["latent_vq"]), "--json"])
    (d,) = json.loads(r.stdout)["files"]
    assert d["tensor"]["dtype"] == "int16" and d["tensor"]["shape"] == [9, 17]
    assert 1 <= d["stats"]["codes_used"] <= 64 and d["stats"]["codebook_size"] == 64


def test_weights_file(files):
    r = runner.invoke(app, ["info", str(files["kl"]), "--json"])
    assert r.exit_code == 0, r.output
    (d,) = json.loads(r.stdout)["files"]
    model = load_native(files["kl"])
    assert d["type"] == "weights" and d["model"] == {"name": "tiny", "sha256": files["sha_kl"], "kind": "kl"}
    assert d["config"] == KL.to_dict() and d["downsampling"] == 2 and d["latent_channels"] == 4
    assert d["parameters"] == sum(p.numel() for p in model.state_dict().values())
    assert d["dtypes"] == {"float32": len(model.state_dict())} and d["tensors"] == len(model.state_dict())


def test_other_safetensors_is_listed(files):
    r = runner.invoke(app, ["info", str(files["other"]), "--json"])
    assert r.exit_code == 0, r.output
    (d,) = json.loads(r.stdout)["files"]
    assert d["type"] == "safetensors" and d["metadata"] == {"hello": "world"} and d["tensors"] == 2
    assert d["tensor_list"] == {"a": {"shape": [2, 3], "dtype": "F32"}, "b": {"shape": [4], "dtype": "F16"}}


def test_table_and_failures(files, tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    r = runner.invoke(app, ["info", str(files["latent"]), str(files["vq"]), str(tmp_path / "nope.safetensors"),
                            str(tmp_path / "broken.safetensors")])
    assert r.exit_code == 1
    for text in ("latent", "33x17", "34x18", "kl.safetensors", "weights", "n_embed=64", files["sha_kl"][:20]):
        assert text in r.stdout, text
    lines = r.stderr.strip().splitlines()
    assert lines == [
        f"{tmp_path / 'nope.safetensors'}: no such file",
        f"{tmp_path / 'broken.safetensors'}: not a safetensors file (header is not valid JSON)",
    ]
    r = runner.invoke(app, ["info", str(tmp_path / "nope.safetensors"), "--json"])
    assert r.exit_code == 1
    assert json.loads(r.stdout) == {"command": "info", "ok": False, "files": [], "failures": [{"path": str(tmp_path / "nope.safetensors"), "reason": "no such file"}]}


def test_half_precision_and_foreign_weights_agree_with_their_latents(tmp_path):
    """A float16 weights file and the same weights in the original ldm layout (no vqcli metadata):
    both encode, and info reports for each the identity its latent files record."""
    torch.manual_seed(3)
    model = AutoEncoder(KL)
    save_native(model.half(), tmp_path / "half.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "bare.safetensors"))
    Image.fromarray(np.full((8, 12, 3), 128, dtype=np.uint8)).save(tmp_path / "img.png")
    for name in ("half", "bare"):
        weights = tmp_path / f"{name}.safetensors"
        r = runner.invoke(app, ["encode", str(tmp_path / "img.png"), "-o", str(tmp_path / name), "--model", str(weights), "--json"])
        assert r.exit_code == 0, r.output
        latent_sha = json.loads(r.stdout)["model"]["sha256"]
        r = runner.invoke(app, ["info", str(weights), str(tmp_path / name / "img.png.safetensors"), "--json"])
        assert r.exit_code == 0, r.output
        weights_info, latent_info = json.loads(r.stdout)["files"]
        assert weights_info["model"]["sha256"] == latent_info["model_sha256"] == latent_sha
        assert weights_info["dtypes"] == {"float16": len(model.state_dict())}  # as stored
    assert weights_info["type"] == "checkpoint" and weights_info["format"] == "original"


def test_embedded_model_names(files, tmp_path, monkeypatch):
    import shutil

    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(files["kl"], weights / "default.safetensors")
    shutil.copy(files["vq"], weights / "default-vq.safetensors")
    monkeypatch.setenv("VQCLI_WEIGHTS_DIR", str(weights))
    monkeypatch.chdir(tmp_path)  # (no file named "default" here)
    r = runner.invoke(app, ["info", "default", "default-vq", "--json"])
    assert r.exit_code == 0, r.output
    kl, vq = json.loads(r.stdout)["files"]
    assert kl["type"] == "weights" and kl["model"]["sha256"] == files["sha_kl"]
    assert kl["file"] == str(weights / "default.safetensors")
    assert vq["type"] == "weights" and vq["model"]["kind"] == "vq"
    r = runner.invoke(app, ["info", "default"])
    assert r.exit_code == 0 and "no such file" not in r.output
    # a file named like an embedded model is that file
    (tmp_path / "default").write_bytes(b"junk")
    r = runner.invoke(app, ["info", "default", "--json"])
    assert r.exit_code == 1
