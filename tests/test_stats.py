"""``vqcli stats``: per-channel statistics of latents against numpy over the same values, and the
same numbers from shards merged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vqcli import AutoEncoder, AutoEncoderConfig
from vqcli.cli import app
from vqcli.io import latents as lat

KL = AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)  # f2
VQ = AutoEncoderConfig(kind="vq", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, n_embed=64)
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _write(model: AutoEncoder, path: Path, z: torch.Tensor, *, scaled: bool = False) -> None:
    h, w = z.shape[-2:]
    meta = lat.make_meta(
        model, source=path.name, width=2 * w, height=2 * h, model_name="m", model_embedded=False,
        representation="mean", scaled=scaled,
    )
    lat.write_latent(path, z, meta)


@pytest.fixture(scope="module")
def latent_set(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """Latents of several sizes, far from zero (a naive float32 sum of squares would lose them), one
    of them stored scaled; and the raw values per channel, for numpy."""
    root = tmp_path_factory.mktemp("stats")
    torch.manual_seed(0)
    model = AutoEncoder(KL)
    scaled_model = AutoEncoder(KL.replace(scale_factor=0.5, shift_factor=0.25))
    scaled_model.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    offsets = torch.tensor([1000.0, -3.0, 0.5, 20.0]).view(4, 1, 1)
    spreads = torch.tensor([0.01, 2.0, 0.3, 1.0]).view(4, 1, 1)
    raw = []
    for i, (h, w) in enumerate([(3, 5), (8, 8), (2, 9), (6, 4), (5, 5), (7, 3)]):
        z = offsets + spreads * torch.randn(4, h, w, generator=g, dtype=torch.float32)
        raw.append(z.double().reshape(4, -1).numpy())
        if i == 2:
            _write(scaled_model, root / f"l{i}.png.safetensors", (z - 0.25) * 0.5, scaled=True)
        else:
            _write(model, root / "sub" / f"l{i}.png.safetensors" if i % 2 else root / f"l{i}.png.safetensors", z)
    return root, np.concatenate(raw, axis=1)


def _check(summary: dict, values: np.ndarray, files: int) -> None:
    mean, std = values.mean(axis=1), values.std(axis=1)
    assert summary["files"] == files and summary["channels"] == 4
    np.testing.assert_allclose(summary["mean"], mean, rtol=1e-7, atol=1e-6)  # (float32 storage, then float64)
    np.testing.assert_allclose(summary["std"], std, rtol=1e-5)
    np.testing.assert_allclose(summary["scale_factor"], 1 / std, rtol=1e-5)
    np.testing.assert_allclose(summary["shift_factor"], mean, rtol=1e-7, atol=1e-6)
    assert summary["overall"]["mean"] == pytest.approx(values.mean(), rel=1e-9)
    assert summary["overall"]["std"] == pytest.approx(values.std(), rel=1e-7)
    assert summary["overall"]["scale_factor"] == pytest.approx(1 / values.std(), rel=1e-7)


def test_stats_match_numpy(latent_set):
    root, values = latent_set
    r = cli("stats", root, "--json")
    assert r.exit_code == 0, r.output
    _check(json.loads(r.stdout), values, 6)
    human = cli("stats", root)
    assert human.exit_code == 0 and "scale_factor" in human.stdout and "all" in human.stdout


def test_shards_merged_give_the_same_numbers(latent_set, tmp_path):
    root, values = latent_set
    parts = []
    for i in range(3):
        r = cli("stats", root, "--shard", f"{i}/3", "--json")
        assert r.exit_code == 0, r.output
        body = json.loads(r.stdout)
        assert body["shard"] == f"{i}/3" and body["files"] == 2
        parts.append(tmp_path / f"part{i}.json")
        parts[-1].write_text(r.stdout)
    r = cli("stats", *parts, "--json")
    assert r.exit_code == 0, r.output
    merged = json.loads(r.stdout)
    _check(merged, values, 6)
    whole = json.loads(cli("stats", root, "--json").stdout)
    np.testing.assert_allclose(merged["std"], whole["std"], rtol=1e-12)


def test_files_that_cannot_be_measured_are_reported(latent_set, tmp_path):
    root, values = latent_set
    torch.manual_seed(0)
    vq = AutoEncoder(VQ)
    meta = lat.make_meta(vq, source="v.png", width=8, height=8, model_name="vq", model_embedded=False, representation="indices")
    lat.write_latent(tmp_path / "v.png.safetensors", torch.zeros(4, 4, dtype=torch.int64), meta)
    (tmp_path / "bad.json").write_text('{"partial": {"format": "vqcli.latent_stats", "count": [1], "mean": [0]}}')
    r = cli("stats", root, tmp_path / "v.png.safetensors", tmp_path / "bad.json", "--json")
    assert r.exit_code == 1
    _check(json.loads(r.stdout), values, 6)  # the others still measured
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert any("v.png.safetensors" in x and "codebook indices" in x for x in lines)
    assert any("bad.json" in x and "not a partial result" in x for x in lines)
    r = cli("stats", tmp_path / "v.png.safetensors")
    assert r.exit_code == 1 and "no latent values to measure" in r.stderr


@pytest.mark.slow
def test_torchrun_ranks_merge_their_sums(latent_set):
    from test_distributed import torchrun

    root, values = latent_set
    p = torchrun("stats", root, "--json", timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    (line,) = [x for x in p.stdout.splitlines() if x.startswith("{")]  # rank 0 alone prints
    _check(json.loads(line), values, 6)
