"""Non-finite values anywhere in a run are an error for that file (issue 17, finding 12): an
encoder or decoder whose weights overflow float32 (scaled by 1e36) fails the file with one line
in encode, decode, roundtrip and features; nothing is written for it, and the other files go on."""

from __future__ import annotations

import pytest
import torch
from _scaleout import KL, VQ, photo, save_model
from PIL import Image
from typer.testing import CliRunner

from vqcli.checkpoints.native import load_native, save_native
from vqcli.cli import app
from vqcli.pipeline.batching import finite, vq_indices

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def overflowing(path, config, part: str, seed: int = 0):
    """The tiny model with ``part``'s (encoder or decoder) weights times 1e36: inf, then NaN."""
    model = load_native(save_model(path, config, seed))
    with torch.no_grad():
        for p in getattr(model, part).parameters():
            if p.ndim > 1:
                p.mul_(1e36)
    model.invalidate_identity()
    save_native(model, path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("nan-images")
    for i in range(2):
        Image.fromarray(photo(16, 16, i)).save(root / f"{i}.png")
    return root


def failed_each(r, images, what: str) -> None:
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    for name in ("0.png", "1.png"):
        lines = [ln for ln in r.stderr.splitlines() if name in ln]
        assert len(lines) == 1 and "NaN or infinite" in lines[0], (what, r.stderr)


@pytest.mark.parametrize("config", [VQ, KL], ids=["vq", "kl"])
def test_encode_refuses_an_encoder_that_gives_nan(images, tmp_path, config):
    model = overflowing(tmp_path / "m.safetensors", config, "encoder")
    r = invoke("encode", images, "-o", tmp_path / "out", "--model", model, "--device", "cpu")
    failed_each(r, images, "encode")
    assert not list((tmp_path / "out").rglob("*.safetensors"))  # (old: VQ indices all 0, exit 0)


@pytest.mark.parametrize("config, part", [(VQ, "encoder"), (VQ, "decoder"), (KL, "encoder"), (KL, "decoder")],
                         ids=["vq-encoder", "vq-decoder", "kl-encoder", "kl-decoder"])
def test_roundtrip_refuses_nan_on_either_side(images, tmp_path, config, part):
    model = overflowing(tmp_path / "m.safetensors", config, part)
    r = invoke("roundtrip", images, "-o", tmp_path / "out", "--model", model, "--device", "cpu")
    failed_each(r, images, "roundtrip")  # (old: exit 0, PSNR about 5, a black image)
    assert not list((tmp_path / "out").rglob("*.png"))


def test_decode_refuses_a_decoder_that_gives_nan(images, tmp_path):
    bad = overflowing(tmp_path / "bad.safetensors", VQ, "decoder")  # (its encoder is finite)
    assert invoke("encode", images, "-o", tmp_path / "lat2", "--model", bad, "--device", "cpu").exit_code == 0
    r = invoke("decode", tmp_path / "lat2", "-o", tmp_path / "img", "--model", bad, "--device", "cpu")
    assert r.exit_code == 1 and r.stderr.count("NaN or infinite") == 2, r.output
    assert not list((tmp_path / "img").rglob("*.png"))


def test_features_refuses_nan_maps(images, tmp_path):
    model = overflowing(tmp_path / "m.safetensors", KL, "decoder")
    r = invoke("features", images / "0.png", "-o", tmp_path / "f", "--model", model, "--device", "cpu", "-q")
    assert r.exit_code == 1 and "NaN or infinite" in r.stderr and "0.png" in r.stderr, r.output
    assert not (tmp_path / "f" / "features.safetensors").exists()


def test_vq_indices_mark_non_finite_positions():
    from vqcli import AutoEncoder

    torch.manual_seed(0)
    ae = AutoEncoder(VQ).eval()
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        good = vq_indices(ae, x)
        assert finite(good) and torch.equal(good, ae.encode_indices(x))
        x[0, :, 0, 0] = float("nan")
        marked = vq_indices(ae, x)
    assert not finite(marked) and int(marked.min()) == -1
    assert finite(torch.zeros(0, dtype=torch.long)) and not finite(torch.tensor([float("inf")]))
