"""Tiled execution gives the untiled result, and really bounds the memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from vqcli import AutoEncoder, AutoEncoderConfig
from vqcli.tiling import bounded_memory, parse_size, tiles, whole_stats


def _randomised(config: AutoEncoderConfig, seed: int = 0) -> AutoEncoder:
    """A model whose GroupNorm affines are not the identity, so that wrong statistics show."""
    torch.manual_seed(seed)
    model = AutoEncoder(config).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model


KL = AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4)
VQ = AutoEncoderConfig(kind="vq", ch=32, ch_mult=(1, 2), num_res_blocks=2, z_channels=4, n_embed=64)


def test_tiles_cover_every_pixel_once():
    covered = torch.zeros(37, 50, dtype=torch.int32)
    for t in tiles(37, 50, 16, 3):
        covered[t.core_y0 : t.core_y1, t.core_x0 : t.core_x1] += 1
        assert t.y0 == max(0, t.core_y0 - 3) and t.y1 == min(37, t.core_y1 + 3)
    assert torch.equal(covered, torch.ones_like(covered))


def test_whole_stats_match_group_norm_statistics():
    x = torch.randn(2, 64, 19, 23) * 3 + 1
    mean, var = whole_stats(x, 32)
    grouped = x.reshape(2, 32, -1)
    torch.testing.assert_close(mean, grouped.mean(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, grouped.var(-1, unbiased=False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [KL, VQ], ids=["kl", "vq"])
def test_tiled_encode_and_decode_equal_untiled(config):
    model = _randomised(config)
    x = torch.rand(1, 3, 160, 224) * 2 - 1  # several tiles at every level with a tiny budget
    with torch.inference_mode():
        moments = model.encode_moments(x)
        image = model.decode(model.encode(x))
        with bounded_memory(model, budget=256 * 1024):
            moments_tiled = model.encode_moments(x)
            image_tiled = model.decode(model.encode(x))
    assert (moments_tiled - moments).abs().max().item() <= 1e-4
    assert (image_tiled - image).abs().max().item() <= 1e-4
    if config.kind == "vq":
        with torch.inference_mode(), bounded_memory(model, budget=256 * 1024):
            assert torch.equal(model.encode_indices(x), torch.inference_mode()(model.encode_indices)(x))


def test_tiling_with_per_tile_statistics_would_differ():
    """The guard of the test above: normalising each tile by itself is visibly wrong."""
    model = _randomised(KL)
    x = torch.rand(1, 3, 160, 224) * 2 - 1
    block = model.encoder.down[0].block[0]
    with torch.inference_mode():
        h = model.encoder.conv_in(x)
        whole = block(h)
        left, right = block(h[..., :112]), block(h[..., 112:])
    assert (torch.cat([left, right], dim=-1) - whole).abs().max().item() > 1e-2


def test_tiling_leaves_the_model_as_it_was():
    model = _randomised(KL)
    with bounded_memory(model, budget=1024):
        pass
    assert all("forward" not in vars(m) for m in model.modules())


def test_parse_size():
    assert parse_size("8GB") == 8 * 2**30
    assert parse_size("512 MiB") == 512 * 2**20
    assert parse_size("1000") == 1000
    with pytest.raises(ValueError, match="not a memory size"):
        parse_size("lots")


_PEAK = textwrap.dedent(
    """
    import json, sys, torch
    from vqcli import AutoEncoder, AutoEncoderConfig
    from vqcli.tiling import bounded_memory
    torch.set_num_threads(1)
    tiled = sys.argv[1] == "tiled"
    model = AutoEncoder(AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=4)).eval()
    z = torch.randn(1, 4, 128, 128)  # f8: a 1024x1024 image, a cheap 16,384-token middle attention
    def peak_kb():  # VmHWM: this program's own high-water mark (ru_maxrss keeps the forking parent's)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    base = peak_kb()
    with torch.inference_mode():
        if tiled:
            with bounded_memory(model, budget=64 * 2**20):
                out = model.decode(z)
        else:
            out = model.decode(z)
    print(json.dumps({"growth_mb": (peak_kb() - base) / 1024}))
    """
)


@pytest.mark.slow
def test_tiled_decode_really_uses_less_memory():
    """A 1024x1024 decode: untiled, four or five maps of the image's size (32 or 64 channels) are
    alive at once inside a residual block; tiled, two. Peak RSS growth measured in fresh processes."""

    def growth(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", _PEAK, mode], capture_output=True, text=True, check=True)
        return json.loads(out.stdout)["growth_mb"]

    untiled, tiled = growth("untiled"), growth("tiled")
    one_map_mb = 64 * 1024 * 1024 * 4 / 2**20  # 64 channels at 1024x1024, float32: 256 MB
    assert tiled < untiled - one_map_mb, (tiled, untiled)


def test_cli_max_memory_gives_the_same_latents_and_images(tmp_path):
    """`--max-memory` small enough to tile every layer changes nothing but the memory."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from vqcli.cli import app

    model = tmp_path / "m.safetensors"
    _randomised(KL).save(model)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (72, 100, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    runner = CliRunner()
    for name, extra in (("whole", []), ("tiled", ["--max-memory", "64KB"])):
        for args in (
            ["encode", str(tmp_path / "a.png"), "-o", str(tmp_path / f"lat-{name}")],
            ["decode", str(tmp_path / f"lat-{name}"), "-o", str(tmp_path / f"rec-{name}")],
        ):
            result = runner.invoke(app, [*args, "--model", str(model), *extra])
            assert result.exit_code == 0, result.output
    whole = load_file(tmp_path / "lat-whole" / "a.png.safetensors")["latent"]
    tiled = load_file(tmp_path / "lat-tiled" / "a.png.safetensors")["latent"]
    assert (whole - tiled).abs().max().item() <= 1e-4
    a = np.asarray(Image.open(tmp_path / "rec-whole" / "a.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "rec-tiled" / "a.png"), dtype=np.int16)
    assert np.abs(a - b).max() <= 1  # 8-bit rounding of equal floats at most one level apart

    bad = runner.invoke(app, ["decode", str(tmp_path / "lat-whole"), "-o", str(tmp_path / "x"), "--model", str(model), "--max-memory", "lots"])
    assert bad.exit_code == 2 and "--max-memory" in bad.stderr
