"""--compile: the torch.compile'd model gives the plain model's results; images too large to fit
whole run in bands as written; without a working C++ compiler the run says so once and goes on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _scaleout import latents, photo, save_model
from PIL import Image

pytestmark = pytest.mark.slow

# name -> (height, width): two of one size (one compiled graph, then reused), one of another
# (a recompile), one large enough to go into bands under --max-memory 4MB (runs as written).
IMAGES = {"a.png": (48, 40), "b.png": (48, 40), "c.png": (36, 52), "big.png": (192, 160)}


def _vqcli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vqcli", *map(str, args)],
        capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    folder = root / "photos"
    folder.mkdir()
    for i, (name, (h, w)) in enumerate(IMAGES.items()):
        Image.fromarray(photo(h, w, seed=i)).save(folder / name)
    model = save_model(root / "kl.safetensors")
    common = ("--model", model, "--max-memory", "4MB", "--json")
    plain = _vqcli("encode", folder, "-o", root / "lat", *common)
    assert plain.returncode == 0, plain.stderr
    plain_dec = _vqcli("decode", root / "lat", "-o", root / "rec", *common)
    assert plain_dec.returncode == 0, plain_dec.stderr
    return root, folder, common


def _images(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)).astype(np.int16) for p in sorted(folder.glob("*.png"))}


def test_compiled_encode_and_decode_match_the_plain_run(setup):
    root, folder, common = setup
    env = {"TORCHINDUCTOR_CACHE_DIR": str(root / "inductor")}
    p = _vqcli("encode", folder, "-o", root / "lat-c", *common, "--compile", env=env)
    assert p.returncode == 0, p.stderr
    assert "torch.compile failed" not in p.stderr
    assert any((root / "inductor").rglob("*.so")), "nothing was compiled"
    plain, compiled = latents(root / "lat"), latents(root / "lat-c")
    assert sorted(plain) == sorted(compiled) and len(plain) == len(IMAGES)
    for name in plain:
        a, b = plain[name], compiled[name]
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-5 * a.abs().max().item(), name
    p = _vqcli("decode", root / "lat", "-o", root / "rec-c", *common, "--compile", env=env)
    assert p.returncode == 0, p.stderr
    plain, compiled = _images(root / "rec"), _images(root / "rec-c")
    assert sorted(plain) == sorted(compiled) and len(plain) == len(IMAGES)
    for name in plain:
        diff = np.abs(plain[name] - compiled[name])
        assert plain[name].shape == compiled[name].shape
        assert diff.max() <= 1 and diff.mean() < 0.01, name  # float rounding may tip a level


def test_without_a_cxx_compiler_the_run_says_so_once_and_goes_on(setup):
    root, folder, common = setup
    env = {"CXX": str(root / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor-empty")}
    p = _vqcli("encode", folder, "-o", root / "lat-n", *common, "--compile", env=env)
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("--compile: torch.compile failed") == 1, p.stderr
    assert "Traceback" not in p.stderr
    plain, fallback = latents(root / "lat"), latents(root / "lat-n")
    assert sorted(plain) == sorted(fallback)
    for name in plain:
        assert (plain[name] - fallback[name]).abs().max().item() == 0.0, name
