"""Helpers shared by the scale-out tests (test_distributed, test_manifest, test_tar, test_shards):
a tiny model file, a folder of real photo crops of mixed sizes in nested folders, reading outputs."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from vqcli import AutoEncoder, AutoEncoderConfig
from vqcli.checkpoints.native import save_native
from vqcli.cli import app

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_images"
# f2 KL (attention in the middle: its 1x1 convolutions round differently with other thread counts)
KL = AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)
VQ = AutoEncoderConfig(kind="vq", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, n_embed=64)

# relative path -> (height, width): nested folders, odd sizes, two of equal size (batched together)
TREE = {
    "a.png": (17, 33),
    "b.jpg": (16, 16),
    "f.png": (1, 1),
    "g/h.png": (24, 20),
    "g/i.png": (31, 7),
    "sub/c.png": (24, 20),
    "sub/deep/d.png": (9, 40),
    "sub/e.webp": (32, 32),
}

runner = CliRunner()


def cli(*args, env: dict | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def save_model(path: Path, config: AutoEncoderConfig = KL, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = AutoEncoder(config)
    if config.kind == "vq":
        with torch.no_grad():
            model.quantize.embedding.weight.normal_(0, 0.3)
    save_native(model, path)
    return path


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A crop of a sample photograph, uint8 RGB."""
    rgb = np.asarray(Image.open(SAMPLES / "astronaut.png").convert("RGB"))
    y, x = (seed * 37) % (rgb.shape[0] - height), (seed * 53) % (rgb.shape[1] - width)
    return rgb[y : y + height, x : x + width].copy()


def encoded(rel: str, seed: int) -> bytes:
    """The file bytes of the image TREE[rel] (format from the extension)."""
    height, width = TREE[rel]
    buf = io.BytesIO()
    fmt = {".png": "PNG", ".jpg": "JPEG", ".webp": "WEBP"}[Path(rel).suffix]
    Image.fromarray(photo(height, width, seed)).save(buf, format=fmt, **({"quality": 95} if fmt != "PNG" else {}))
    return buf.getvalue()


def make_tree(root: Path) -> Path:
    for seed, rel in enumerate(TREE, 1):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(encoded(rel, seed))
    (root / "notes.txt").write_text("not an image: skipped")
    return root


def make_tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    return path


def read_latent(path: Path) -> tuple[torch.Tensor, dict]:
    with safe_open(str(path), "pt") as f:
        return f.get_tensor("latent"), f.metadata()


def latents(folder: Path) -> dict[str, torch.Tensor]:
    """Every latent file under ``folder``, by relative path."""
    return {p.relative_to(folder).as_posix(): read_latent(p)[0] for p in sorted(folder.rglob("*.safetensors"))}


def manifest_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
