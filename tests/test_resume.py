"""Resume keeps only what this run would make: an existing latent or image made from another input,
by another model or with other options is reported (exit 1) and kept until ``--overwrite``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from vqcli import AutoEncoder, AutoEncoderConfig
from vqcli.checkpoints.native import save_native
from vqcli.cli import app

CONFIG = AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def kl_models(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("resume-models")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(d / f"kl{seed}.safetensors")
        save_native(AutoEncoder(CONFIG), paths[-1])
    return paths[0], paths[1]


@pytest.fixture
def two_images(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "in"
    root.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(root / name)
    return root


def _meta(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def _stamps(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def _failures(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "exists, made" in line]


def test_encode_reports_latents_made_with_other_options_and_keeps_them(tmp_path, two_images, kl_models):
    kl, _ = kl_models
    out = tmp_path / "lat"
    assert cli("encode", two_images, "-o", out, "--model", kl).exit_code == 0
    before = _stamps(out)

    r = cli("encode", two_images, "-o", out, "--model", kl, "--scaled")
    assert r.exit_code == 1
    lines = _failures(r.stderr)
    assert len(lines) == 2 and all("made with other options (scaled false (now true))" in x for x in lines)
    assert all(x.endswith("--overwrite to replace") for x in lines)
    assert _stamps(out) == before  # kept, not half-replaced

    r = cli("encode", two_images, "-o", out, "--model", kl, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["skipped"] == 2  # the same options: resume
    assert _stamps(out) == before

    r = cli("encode", two_images, "-o", out, "--model", kl, "--scaled", "--overwrite", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["done"] == 2
    assert _meta(out / "a.png.safetensors")["scaled"] == "true"
    r = cli("encode", two_images, "-o", out, "--model", kl, "--scaled", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["skipped"] == 2


def test_encode_reports_latents_of_another_model_or_another_version_of_the_image(tmp_path, two_images, kl_models):
    kl, other = kl_models
    out = tmp_path / "lat"
    assert cli("encode", two_images, "-o", out, "--model", kl).exit_code == 0
    r = cli("encode", two_images, "-o", out, "--model", other)
    assert r.exit_code == 1 and len(_failures(r.stderr)) == 2
    assert all("exists, made with another model: --overwrite to replace" in x for x in _failures(r.stderr))

    # the image changed since (a new modification time): only its latent is stale
    st = (two_images / "b.png").stat()
    os.utime(two_images / "b.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    r = cli("encode", two_images, "-o", out, "--model", kl, "--json")
    assert r.exit_code == 1
    summary = json.loads(r.stdout)
    assert (summary["skipped"], summary["failed"]) == (1, 1)
    (line,) = _failures(r.stderr)
    assert "b.png" in line and "made from another version of the input" in line


def test_decode_reports_images_made_from_another_latent_or_format_options(tmp_path, two_images, kl_models):
    kl, _ = kl_models
    lat, rec = tmp_path / "lat", tmp_path / "rec"
    assert cli("encode", two_images, "-o", lat, "--model", kl).exit_code == 0
    assert cli("decode", lat, "-o", rec, "--model", kl, "--format", "jpg", "--quality", "90").exit_code == 0
    before = _stamps(rec)
    r = cli("decode", lat, "-o", rec, "--model", kl, "--format", "jpg", "--quality", "90", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["skipped"] == 2

    r = cli("decode", lat, "-o", rec, "--model", kl, "--format", "jpg", "--quality", "70")
    assert r.exit_code == 1 and len(_failures(r.stderr)) == 2
    assert all("quality" in x and x.endswith("--overwrite to replace") for x in _failures(r.stderr))
    assert _stamps(rec) == before

    # a.png re-encoded with other options: its image is stale, b's is not
    assert cli("encode", two_images / "a.png", "-o", lat, "--model", kl, "--scaled", "--overwrite").exit_code == 0
    r = cli("decode", lat, "-o", rec, "--model", kl, "--format", "jpg", "--quality", "90", "--json")
    assert r.exit_code == 1 and json.loads(r.stdout)["skipped"] == 1
    (line,) = _failures(r.stderr)
    assert "a.png.safetensors" in line and "another version of the input" in line
    r = cli("decode", lat, "-o", rec, "--model", kl, "--format", "jpg", "--quality", "90", "--overwrite", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["done"] == 2
