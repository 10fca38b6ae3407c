"""`vqcli train`: it learns, writes a loadable model, resumes from its checkpoint, refuses bad options."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vqcli import AutoEncoderConfig
from vqcli.checkpoints.native import load_native
from vqcli.cli import app
from vqcli.train import Trainer, TrainOptions, learning_rate

from conftest import photo_crops

TINY = ["--ch", "32", "--ch-mult", "1,2", "--num-res-blocks", "1", "--z-channels", "4", "--crop", "16",
        "--batch-size", "4", "--no-bf16", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return photo_crops(tmp_path_factory.mktemp("photos"), "coffee.png", [(0, 0), (150, 200), (300, 400)], 64)


def test_training_lowers_the_loss(photos):
    from vqcli.train import ImageBank

    config = AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)
    trainer = Trainer(config, TrainOptions(steps=60, batch_size=4, crop=16, warmup=5), torch.device("cpu"))
    bank = ImageBank(sorted(photos.iterdir()))
    losses = [trainer.train_step(bank).loss for _ in range(60)]
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10]), losses


def test_learning_rate_warms_up_then_decays():
    opts = TrainOptions(steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    assert learning_rate(0, opts) == pytest.approx(1e-4)
    assert learning_rate(9, opts) == pytest.approx(1e-3)
    assert learning_rate(99, opts) == pytest.approx(1e-4, rel=0.01)
    assert learning_rate(50, opts) < learning_rate(20, opts)


def test_cli_trains_writes_a_loadable_model_and_resumes(photos, tmp_path):
    out = tmp_path / "m.safetensors"
    runner = CliRunner()
    r = runner.invoke(app, ["train", str(photos), "-o", str(out), "--steps", "6", "--until", "3", *TINY])
    assert r.exit_code == 0, r.output
    assert not out.exists() and (tmp_path / "m.safetensors.ckpt").is_file()
    r = runner.invoke(app, ["train", str(photos), "-o", str(out), "--steps", "6", "--resume", "--json", *TINY])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["steps"] == 6
    model = load_native(out)
    assert model.config.ch_mult == (1, 2) and model.config.kind == "kl"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".vqcli-tmp-")]


def test_middle_attention_can_be_left_out(photos, tmp_path):
    runner = CliRunner()
    for flag, expected in (("--no-mid-attention", False), ("--mid-attention", True)):
        out = tmp_path / f"m{expected}.safetensors"
        r = runner.invoke(app, ["train", str(photos), "-o", str(out), "--steps", "2", *TINY, flag])
        assert r.exit_code == 0, r.output
        model = load_native(out)
        assert model.config.mid_attention is expected
        keys = model.state_dict().keys()
        assert any(k.startswith("decoder.mid.attn_1.") for k in keys) is expected
        assert any(k.startswith("encoder.mid.attn_1.") for k in keys) is expected


def test_same_seed_same_model(photos, tmp_path):
    runner = CliRunner()
    for name in ("a", "b"):
        r = runner.invoke(app, ["train", str(photos), "-o", str(tmp_path / f"{name}.safetensors"), "--steps", "3", *TINY])
        assert r.exit_code == 0, r.output
    a, b = load_native(tmp_path / "a.safetensors"), load_native(tmp_path / "b.safetensors")
    assert a.identity() == b.identity()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ch", "48"], "multiple of 32"),
        (["--kind", "gan"], "kl or vq"),
        (["--preset", "nope"], "unknown --preset"),
        (["--crop", "17"], "multiple of the downsampling factor"),
        (["--ch-mult", "1,x"], "comma-separated"),
    ],
)
def test_bad_options_are_refused_with_a_clear_message(photos, tmp_path, args, message):
    base = ["train", str(photos), "-o", str(tmp_path / "m.safetensors"), "--steps", "2", "--quiet"]
    r = CliRunner().invoke(app, [*base, *args])
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert "Traceback" not in r.output and not (tmp_path / "m.safetensors").exists()


def test_existing_output_is_not_replaced(photos, tmp_path):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"precious")
    r = CliRunner().invoke(app, ["train", str(photos), "-o", str(out), "--steps", "2", *TINY])
    assert r.exit_code == 1 and "already exists" in r.output
    assert out.read_bytes() == b"precious"


def _start_model(tmp_path: Path, kind: str) -> tuple[Path, dict]:
    """Weights unlike any vqcli train would draw itself (seed 123), with their own latent factors."""
    from vqcli.checkpoints.native import save_native
    from vqcli.model.autoencoder import AutoEncoder

    torch.manual_seed(123)
    extra = {"n_embed": 64, "embed_dim": 4} if kind == "vq" else {"scale_factor": 0.5, "shift_factor": 0.1}
    model = AutoEncoder(AutoEncoderConfig(kind=kind, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, **extra))
    path = tmp_path / f"start-{kind}.safetensors"
    save_native(model, path)
    return path, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_init_fine_tunes_the_given_weights_and_keeps_their_latent_convention(photos, tmp_path, kind):
    start, weights = _start_model(tmp_path, kind)
    # A learning rate too small to move anything: what comes out is where training started.
    still = ["--crop", "16", "--batch-size", "4", "--no-bf16", "--device", "cpu", "--quiet", "--lr", "1e-12", "--warmup", "1"]
    runner = CliRunner()
    r = runner.invoke(app, ["train", str(photos), "-o", str(tmp_path / "tuned.safetensors"), "--steps", "2", "--init", str(start), *still])
    assert r.exit_code == 0, r.output
    tuned = load_native(tmp_path / "tuned.safetensors")
    for name, value in tuned.state_dict().items():  # the VQ codebook included: kept, not re-seeded
        torch.testing.assert_close(value, weights[name], rtol=0, atol=1e-6, msg=name)
    if kind == "kl":
        assert (tuned.config.scale_factor, tuned.config.shift_factor) == (0.5, 0.1)
    r = runner.invoke(app, ["train", str(photos), "-o", str(tmp_path / "fresh.safetensors"), "--steps", "2", *TINY, "--lr", "1e-12"])
    assert r.exit_code == 0, r.output
    fresh = load_native(tmp_path / "fresh.safetensors").state_dict()
    assert not torch.allclose(fresh["encoder.conv_in.weight"], weights["encoder.conv_in.weight"])  # without --init: drawn afresh


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ch", "64"], "leave out --preset and the architecture options"),
        (["--preset", "default"], "leave out --preset and the architecture options"),
        (["--resume"], "give one of them"),
    ],
)
def test_init_with_conflicting_options_is_refused(photos, tmp_path, args, message):
    start, _ = _start_model(tmp_path, "kl")
    out = tmp_path / "m.safetensors"
    r = CliRunner().invoke(app, ["train", str(photos), "-o", str(out), "--steps", "2", "--quiet", "--init", str(start), *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output and not out.exists()


def test_init_from_nothing_names_it(photos, tmp_path):
    out = tmp_path / "m.safetensors"
    r = CliRunner().invoke(app, ["train", str(photos), "-o", str(out), "--steps", "2", "--quiet", "--init", str(tmp_path / "nope.safetensors")])
    assert r.exit_code == 2, r.output
    assert "--init" in r.output and "nope.safetensors" in r.output and "Traceback" not in r.output and not out.exists()
