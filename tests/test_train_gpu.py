"""GPU training preparation, checked on the CPU: the wall-clock limit, reading back from the
device only every few steps, the 8-bit image bank, and scripts/train_gpu.sh end to end in its dry
run (the same candidates, the same code paths, a few seconds each), so that it works first time on
the GPU machine."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqcli import AutoEncoderConfig
from vqcli.checkpoints.native import load_native
from vqcli.train import ImageBank, Trainer, TrainOptions, learning_rate, train

ROOT = Path(__file__).resolve().parents[1]
TINY = AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, mid_attention=False)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gpu_photos")
    rgb = np.asarray(Image.open(ROOT / "sample_images" / "coffee.png").convert("RGB"))
    for split, spots in (("train", [(0, 0), (150, 200), (300, 260)]), ("val", [(100, 100), (200, 300)])):
        (folder / split).mkdir()
        for i, (y, x) in enumerate(spots):
            Image.fromarray(rgb[y : y + 96, x : x + 128]).save(folder / split / f"p{i}.jpg", quality=95)
    grey = np.asarray(Image.open(ROOT / "sample_images" / "camera.png").convert("L"))[:100, :120]
    Image.fromarray(grey).save(folder / "train" / "grey.png")
    return folder


def test_learning_rate_follows_the_time_used():
    opts = TrainOptions(steps=10**6, warmup=10, lr=1e-3, min_lr_ratio=0.1, max_minutes=1.0)
    assert learning_rate(5, opts, time_used=0.9) == pytest.approx(6e-4)  # warm-up first
    assert learning_rate(20, opts, time_used=0.0) == pytest.approx(1e-3, rel=1e-4)
    assert learning_rate(20, opts, time_used=0.5) == pytest.approx(0.55e-3)
    assert learning_rate(20, opts, time_used=1.0) == pytest.approx(1e-4)


def test_max_minutes_ends_the_run_with_a_scaled_model(photos, tmp_path, monkeypatch):
    import vqcli.train

    now = [0.0]

    def clock() -> float:  # a clock that advances 1 s at each reading: the run sees 6 steps' time pass
        now[0] += 1.0
        return now[0]

    monkeypatch.setattr(vqcli.train.time, "monotonic", clock)
    out = tmp_path / "m.safetensors"
    opts = TrainOptions(steps=10**6, batch_size=2, crop=16, warmup=2, max_minutes=0.1)
    seen = []
    model = train(sorted((photos / "train").iterdir()), out, TINY, opts, device=torch.device("cpu"), on_progress=seen.append)
    assert model is not None and out.is_file()
    assert [p.step for p in seen] == [1, 2, 3]  # readings at 1 s (start), then 2+3, 4+5, 6+7 s: the third step ends past 6 s
    lrs = [p.lr for p in seen]
    assert lrs[1] == pytest.approx(opts.lr * 2 / 2) and lrs[2] < lrs[1]  # the cosine follows the time used
    loaded = load_native(out)
    assert loaded.config.scale_factor != 1.0 and loaded.config.shift_factor != 0.0  # measured, as at a last step
    assert loaded.config.scale_factor == model.config.scale_factor
    assert (tmp_path / "m.safetensors.ckpt").is_file()


def test_loss_is_read_back_only_every_report_every_steps(photos):
    trainer = Trainer(TINY, TrainOptions(steps=100, batch_size=2, crop=16, warmup=2, report_every=3), torch.device("cpu"))
    bank = ImageBank(sorted((photos / "train").iterdir()))
    losses = [trainer.train_step(bank).loss for _ in range(7)]
    assert math.isnan(losses[0]) and math.isnan(losses[1])
    assert losses[2] == losses[3] == losses[4] and losses[5] == losses[6]
    assert losses[5] != losses[2]


def test_vq_codebook_bookkeeping_stays_on_the_training_device(photos):
    config = AutoEncoderConfig(kind="vq", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, n_embed=64)
    trainer = Trainer(config, TrainOptions(steps=30, batch_size=2, crop=16, warmup=2, dead_code_steps=3), torch.device("cpu"))
    bank = ImageBank(sorted((photos / "train").iterdir()))
    progress = [trainer.train_step(bank) for _ in range(12)]
    assert trainer.last_used.device.type == "cpu" and int(trainer.last_used.max()) == 12
    assert 0.0 < progress[-1].codes_used <= 1.0


def test_image_bank_keeps_8_bit_images_shrunk_to_max_side(photos):
    files = sorted((photos / "train").iterdir())
    bank = ImageBank(files, max_side=64)
    assert all(im.dtype == torch.uint8 and max(im.shape[1:]) == 64 for im in bank.images)
    assert bank.grey.tolist() == [name.stem == "grey" for name in files]
    batch = bank.batch(5, 16, 0.5, torch.Generator().manual_seed(0))
    assert batch.shape == (5, 3, 16, 16) and batch.dtype == torch.float32
    assert -1.0 <= float(batch.min()) < float(batch.max()) <= 1.0


@pytest.mark.slow
def test_train_gpu_script_dry_run(photos, tmp_path):
    """The GPU script's candidates, trained a few seconds each on the CPU; a broken extra candidate
    fails alone and is reported, the others are evaluated and returned."""
    out = tmp_path / "out"
    env = dict(os.environ, DRY_RUN="1", DATA=str(photos), MINUTES="0.02", PYTHON="python",
               EXTRA_CANDIDATES="broken default --preset default --ch 48")
    result = subprocess.run(["bash", str(ROOT / "scripts" / "train_gpu.sh"), str(out)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout, (out / "log").read_text() if (out / "log").exists() else "")
    files = sorted(p.name for p in out.iterdir())
    report = json.loads((out / "report.json").read_text())
    runner_up = "kl-f8" if report["chosen"]["default"] == "kl-f4" else "kl-f4"
    assert files == [f"candidate-{runner_up}.safetensors", "default-vq.safetensors", "default.safetensors", "log", "report.json", "report.md"]
    assert all((out / f).stat().st_size <= 16 * 2**20 for f in files)
    assert report["candidates"]["broken"]["failed"] and "multiple of 32" in report["candidates"]["broken"]["log_tail"]
    assert set(report["chosen"]) == {"default", "default-vq"}
    default, vq = load_native(out / "default.safetensors"), load_native(out / "default-vq.safetensors")
    assert (default.config.name, default.config.kind) == ("default", "kl")
    assert (vq.config.name, vq.config.kind, vq.config.n_embed) == ("default-vq", "vq", 1024)
    runner = load_native(out / f"candidate-{runner_up}.safetensors").config
    shapes = {report["chosen"]["default"]: default.config, runner_up: runner}
    assert (shapes["kl-f4"].downsampling, shapes["kl-f4"].z_channels, shapes["kl-f4"].ch) == (4, 4, 64)
    assert (shapes["kl-f8"].downsampling, shapes["kl-f8"].z_channels, shapes["kl-f8"].name) == (8, 16, "default")
    for c in ("kl-f4", "kl-f8", "vq-f4"):
        entry = report["candidates"][c]
        assert set(entry["eval"]) == {"sample_images", "validation"}
        assert entry["training"]["steps"] >= 1
        assert math.isfinite(entry["eval"]["validation"]["mean_ciede2000"])
    assert "FAILED" in (out / "report.md").read_text()
