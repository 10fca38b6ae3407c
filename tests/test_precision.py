"""Reduced precision: the output layers stay float32 under autocast, bfloat16 stays within 40 dB of
float32 on a real photograph, and ``--dtype auto`` chooses by measurement, never a precision that
falls short of 40 dB."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_KL, TINY_VQ, randomize_
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from vqcli.checkpoints.load import resolve_model
from vqcli.checkpoints.native import save_native
from vqcli.cli import app
from vqcli.io.padding import pad_to_multiple, to_model_input
from vqcli.model.autoencoder import AutoEncoder
from vqcli.speed.context import compute_context, memory_format_for
from vqcli.speed.precision import (
    AUTO_MIN_GAIN,
    AUTO_MIN_PSNR,
    check_image,
    choose_dtype,
)

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
CPU = torch.device("cpu")


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """On [-1, 1] images, by numpy in float64 (peak-to-peak 2)."""
    a64 = np.clip(a.double().numpy(), -1, 1)
    b64 = np.clip(b.double().numpy(), -1, 1)
    mse = np.mean(((a64 - b64) / 2) ** 2)
    return math.inf if mse == 0 else float(-10 * np.log10(mse))


def _roundtrip(model: AutoEncoder, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    with compute_context(CPU, dtype, model=model):
        if model.config.kind == "vq":
            return model.decode_indices(model.encode_indices(x)).float()
        return model.decode(model.encode(x)).float()


@pytest.mark.parametrize("config", [TINY_KL, TINY_VQ], ids=["kl", "vq"])
def test_output_layers_stay_float32_under_bfloat16_autocast(config):
    model = randomize_(AutoEncoder(config), 0).eval()
    seen: dict[str, torch.dtype] = {}
    layers = {
        "encoder.conv_out": model.encoder.conv_out,
        "quant_conv": model.quant_conv,
        "post_quant_conv": model.post_quant_conv,
        "decoder.conv_out": model.decoder.conv_out,
        "decoder.mid.block_1.conv1": model.decoder.mid.block_1.conv1,  # an inner layer: reduced
    }
    for name, layer in layers.items():
        layer.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, (i[0].dtype, o.dtype)))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    _roundtrip(model, x, torch.bfloat16)
    assert seen["decoder.mid.block_1.conv1"][1] == torch.bfloat16  # autocast really was on
    for name in ("encoder.conv_out", "quant_conv", "post_quant_conv", "decoder.conv_out"):
        assert seen[name] == (torch.float32, torch.float32), name


def test_bfloat16_within_40_db_of_float32_on_a_photograph():
    """The issue's bound for reduced precision, on the embedded model and a real photograph."""
    model = resolve_model("default", device=CPU, dtype=torch.float32)
    rgb = np.asarray(Image.open(SAMPLES / "astronaut.png").convert("RGB"), dtype=np.float32)[:192, :256] / 255
    x = pad_to_multiple(to_model_input(rgb), model.config.downsampling)
    reference = _roundtrip(model, x, torch.float32)
    assert _psnr(_roundtrip(model, x, torch.bfloat16), reference) >= 40.0


def test_auto_reports_what_it_measured_and_picks_the_fastest_that_passes():
    model = resolve_model("default", device=CPU, dtype=torch.float32)
    choice = choose_dtype(model, CPU, candidates=[torch.bfloat16])
    assert set(choice.psnr) == set(choice.seconds) == {"float32", "bfloat16"}
    # the reported PSNR is that of the check image, recomputed here independently
    x = check_image(128, model.config.downsampling)
    expected = _psnr(_roundtrip(model, x, torch.bfloat16), _roundtrip(model, x, torch.float32))
    assert choice.psnr["bfloat16"] == pytest.approx(expected, abs=0.5)
    # the fastest within 40 dB, a reduced precision counting only where AUTO_MIN_GAIN times as fast
    fp32 = choice.seconds["float32"]
    passing = {name: s for name, s in choice.seconds.items()
               if choice.psnr[name] >= AUTO_MIN_PSNR and (name == "float32" or s * AUTO_MIN_GAIN <= fp32)}
    fastest = min(passing, key=passing.get)
    assert str(choice.dtype).removeprefix("torch.") == fastest
    # and the model is left in the memory format of the precision chosen
    conv = model.decoder.conv_in.weight
    assert conv.is_contiguous(memory_format=memory_format_for(choice.dtype))


def test_auto_never_chooses_a_precision_below_40_db():
    """A model whose output amplifies rounding: bfloat16 is faster but too far from float32."""
    model = randomize_(AutoEncoder(TINY_KL), 1).eval()
    with torch.no_grad():
        model.decoder.conv_out.weight.mul_(300.0)  # every rounding error of the features x300
    choice = choose_dtype(model, CPU, candidates=[torch.bfloat16])
    assert choice.psnr["bfloat16"] < AUTO_MIN_PSNR
    assert choice.dtype == torch.float32
    assert "float32" in choice.describe()


def test_auto_without_a_faster_precision_is_float32(monkeypatch):
    monkeypatch.setattr("vqcli.speed.precision.auto_candidates", lambda device: [])
    model = randomize_(AutoEncoder(TINY_KL), 2).eval()
    assert choose_dtype(model, CPU).dtype == torch.float32


def test_cli_dtype_auto_says_what_it_chose_and_computes_in_it(tmp_path, monkeypatch):
    """Where no reduced precision is worth measuring, auto is float32: the latents equal --dtype float32's."""
    monkeypatch.setattr("vqcli.speed.precision.auto_candidates", lambda device: [])
    model = tmp_path / "m.safetensors"
    save_native(randomize_(AutoEncoder(TINY_KL), 3), model)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    runner = CliRunner()
    outputs, stderr = {}, {}
    for dtype in ("auto", "float32"):
        out = tmp_path / dtype
        result = runner.invoke(app, ["encode", str(tmp_path / "a.png"), "-o", str(out), "--model", str(model), "--dtype", dtype, "--json"])
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        assert summary["dtype"] == "float32"
        outputs[dtype] = load_file(out / "a.png.safetensors")["latent"]
        stderr[dtype] = result.stderr
    assert torch.equal(outputs["auto"], outputs["float32"])
    assert "--dtype auto: float32" in stderr["auto"] and "--dtype auto" not in stderr["float32"]


def test_cli_refuses_unknown_dtype(tmp_path):
    result = CliRunner().invoke(app, ["encode", str(SAMPLES / "camera.png"), "-o", str(tmp_path / "o"), "--dtype", "float8"])
    assert result.exit_code == 2
    assert "unknown dtype 'float8'" in result.stderr and "auto" in result.stderr


def test_decode_auto_chooses_per_embedded_model(tmp_path, monkeypatch):
    """Without --model, each latent's embedded model gets its own choice (float32 where no faster
    precision exists): images equal --dtype float32's."""
    monkeypatch.setattr("vqcli.speed.precision.auto_candidates", lambda device: [])
    rgb = np.asarray(Image.open(SAMPLES / "coffee.png").convert("RGB"))[:64, :96]
    Image.fromarray(rgb).save(tmp_path / "c.png")
    runner = CliRunner()
    assert runner.invoke(app, ["encode", str(tmp_path / "c.png"), "-o", str(tmp_path / "lat")]).exit_code == 0
    images = {}
    for dtype in ("auto", "float32"):
        result = runner.invoke(app, ["decode", str(tmp_path / "lat"), "-o", str(tmp_path / dtype), "--dtype", dtype, "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["dtype"] == dtype
        images[dtype] = np.asarray(Image.open(tmp_path / dtype / "c.png"))
        if dtype == "auto":
            assert "default: --dtype auto: float32" in result.stderr
    assert np.array_equal(images["auto"], images["float32"])


_HEAP_KEPT = """
import torch
from vqcli.speed.heap import _LIBC, fast_allocator

def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))

print(_LIBC is not None)
base = rss()
with fast_allocator():
    t = torch.empty(3 * 2**29, dtype=torch.uint8).fill_(1)  # 1.5 GB, larger than a batch-4 map
    del t
    inside = rss()
print(inside - base, rss() - base)
"""


def test_fast_allocator_keeps_freed_maps_and_returns_them_after():
    """Inside fast_allocator a freed map stays in the heap, however large (the next layer reuses
    its pages instead of faulting them in again); leaving it gives the memory back."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _HEAP_KEPT], capture_output=True, text=True, check=True).stdout.split()
    if out[0] != "True":
        pytest.skip("not glibc: the allocator settings do not apply")
    kept, after = int(out[1]), int(out[2])
    assert kept >= 2**30, kept / 2**20
    assert after < 2**28, after / 2**20
