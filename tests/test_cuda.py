"""The CUDA path, on a GPU (every test here is marked ``cuda`` and skipped without one):
placement, float32 parity with the CPU, reduced precision (a copy of the model with cast weights),
the float16 overflow redone with the float32 model, tiling under a small budget, and the CLI with
``--device cuda``. benchmarks/gpu_check.sh runs them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqcli import AutoEncoder, AutoEncoderConfig
from vqcli.checkpoints.native import save_native
from vqcli.pipeline.batching import Item, compute
from vqcli.pipeline.results import Job
from vqcli.speed import budget as budgets
from vqcli.speed.context import compute_context, compute_model, memory_format_for, prepare_model
from vqcli.speed.precision import AUTO_MIN_PSNR, choose_dtype

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
GPU = torch.device("cuda")
# f4, attention at level 1 and in the middle: every kind of layer, small enough for any GPU
CONFIG = AutoEncoderConfig(
    kind="kl", ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,), z_channels=4, resolution=32
)


@contextlib.contextmanager
def strict_float32():
    """float32 without TF32 (cuDNN convolutions use TF32 by default; parity needs it off)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def model_on(device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0) -> AutoEncoder:
    torch.manual_seed(seed)
    return prepare_model(AutoEncoder(CONFIG), device, dtype)


def image(size: int = 64, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def roundtrip(model, x, device, dtype, budget=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode and decode as a run does: the model ``dtype`` runs (``compute_model``), maps in the
    memory format for it."""
    runner = compute_model(model, device, dtype)
    with compute_context(device, dtype, model=runner, budget=budget):
        z = runner.encode(x.to(device).contiguous(memory_format=memory_format_for(dtype, device)))
        y = runner.decode(z)
    return z, y


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).abs().max() / b.abs().max())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float().cpu().clamp(-1, 1) - b.float().cpu().clamp(-1, 1)) / 2).pow(2).mean())
    return math.inf if mse == 0 else -10 * math.log10(mse)


def test_model_and_outputs_live_on_the_gpu_and_match_the_cpu_in_float32():
    x = image()
    z_cpu, y_cpu = roundtrip(model_on(CPU), x, CPU, torch.float32)
    model = model_on(GPU)
    assert all(p.device.type == "cuda" for p in model.parameters())
    with strict_float32():
        z, y = roundtrip(model, x, GPU, torch.float32)
    assert z.device.type == "cuda" and y.device.type == "cuda"
    assert z.dtype == y.dtype == torch.float32
    assert rel(z, z_cpu) < 1e-4 and rel(y, y_cpu) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_reduced_precision_on_the_gpu_stays_close_to_float32(dtype):
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    x = image()
    with strict_float32():
        _, reference = roundtrip(model_on(GPU), x, GPU, torch.float32)
    model = model_on(GPU, dtype)
    runner = compute_model(model, GPU, dtype)  # (the copy with cast weights, kept: roundtrip runs this one)
    seen = {}
    for name in ("encoder.conv_in", "decoder.mid.block_1.conv1", "encoder.conv_out", "decoder.conv_out"):
        runner.get_submodule(name).register_forward_hook(  # (returns None)
            lambda m, i, o, name=name: seen.setdefault(name, []).append((i[0].dtype, o.dtype)))
    z, y = roundtrip(model, x, GPU, dtype)
    # reduced inside (the float32 image cast on the way in), float32 at the output layers
    assert seen["encoder.conv_in"] == seen["decoder.mid.block_1.conv1"] == [(dtype, dtype)]
    assert seen["encoder.conv_out"] == seen["decoder.conv_out"] == [(torch.float32, torch.float32)]
    assert z.dtype == y.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the model itself is not cast
    assert torch.isfinite(y).all()
    assert psnr(y, reference) > 30  # bfloat16 keeps 8 bits of mantissa, float16 11


def _overflowing(model: AutoEncoder) -> AutoEncoder:
    """Weights scaled so that the first convolution's output passes float16's largest value (65504),
    as SDXL's VAE does in float16: a GroupNorm follows, so float32 absorbs the scale."""
    with torch.no_grad():
        model.encoder.conv_in.weight.mul_(1e6)
        model.encoder.conv_in.bias.mul_(1e6)
    return model


def test_float16_overflow_is_redone_in_float32_on_the_gpu():
    model = _overflowing(model_on(GPU))
    x = image()
    runner = compute_model(model, GPU, torch.float16)
    with compute_context(GPU, torch.float16, model=runner):
        assert not torch.isfinite(runner.encode(x.to(GPU))).all()  # it does overflow

    def encode(m, t):
        return m.encode(t)

    items = [Item(Job(Path(f"{i}.png"), Path("."), Path(f"{i}.png"), Path("o")), x[i : i + 1], (0,), model) for i in range(1)]
    (item, out, redone), = compute(items, encode, torch.float16)
    assert redone and isinstance(out, torch.Tensor) and torch.isfinite(out).all()
    with compute_context(GPU, torch.float32, model=model):
        expected = model.encode(x.to(GPU)).cpu()
    assert rel(out, expected) < 1e-3  # (TF32 as run: both the same way)


def test_tiling_on_the_gpu_under_a_small_budget_equals_untiled():
    model = model_on(GPU)
    x = image(128)
    with strict_float32():
        z, whole = roundtrip(model, x, GPU, torch.float32, budget=2**40)
        _, tiled = roundtrip(model, x, GPU, torch.float32, budget=2**20)  # 1 MB: many bands
    assert tiled.shape == whole.shape
    assert rel(tiled, whole) < 1e-5


def test_tiled_decode_keeps_peak_gpu_memory_near_its_budget():
    model = model_on(GPU)
    z = torch.randn(1, 4, 128, 128, device=GPU)  # 512 px out: 32 MB a 32-channel map in float32
    budget = 64 * 2**20
    torch.cuda.synchronize()
    with compute_context(GPU, torch.float32, model=model, budget=2**40):
        model.decode(z)  # (warm-up: cuDNN's workspaces)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with compute_context(GPU, torch.float32, model=model, budget=budget):
        y = model.decode(z)
    tiled_peak = torch.cuda.max_memory_allocated() - base
    del y
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with compute_context(GPU, torch.float32, model=model, budget=2**40):
        y = model.decode(z)
    whole_peak = torch.cuda.max_memory_allocated() - base
    assert tiled_peak < whole_peak / 2
    assert tiled_peak < 2 * budget + y.nbytes  # the output itself is whole


def _decode_item(z: torch.Tensor, model) -> list[Item]:
    return [Item(Job(Path("z"), Path("."), Path("z"), Path("o")), z, (0,), model)]


def _decode(m, t):
    return m.decode(t)


def test_a_real_out_of_memory_error_is_retried_in_tiles_with_the_untiled_result(caplog):
    """The process capped (``set_per_process_memory_fraction``) below what a whole 1024 px decode
    needs: the first try runs out of memory, the retry in tiles fits and gives the whole result."""
    model = model_on(GPU)
    z = torch.randn(1, 4, 256, 256, generator=torch.Generator().manual_seed(3))
    with strict_float32():
        with compute_context(GPU, torch.float32, model=model, budget=2**40):
            expected = model.decode(z.to(GPU)).cpu()
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        cap = torch.cuda.memory_allocated() + 400 * 2**20  # a whole decode needs about 1 GB more
        torch.cuda.set_per_process_memory_fraction(cap / total)
        try:
            with caplog.at_level(logging.WARNING):
                (_, out, redone), = compute(_decode_item(z, model), _decode, torch.float32, budget=2**40)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
    assert isinstance(out, torch.Tensor), out
    assert rel(out, expected) < 1e-5
    assert len([r for r in caplog.records if "out of memory" in r.getMessage()]) == 1


def test_the_default_budget_comes_from_the_gpus_free_memory(monkeypatch):
    """With little free on the device (``mem_get_info`` says 48 MB), a decode tiles on its own: less
    memory, the same result."""
    model = model_on(GPU)
    z = torch.randn(1, 4, 128, 128, device=GPU)
    with strict_float32():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with compute_context(GPU, torch.float32, model=model):  # (an H200 has room: whole)
            whole = model.decode(z)
        whole_peak = torch.cuda.max_memory_allocated() - base
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (48 * 2**20, 2**36))
        torch.cuda.empty_cache()
        assert budgets.default_budget(GPU) < 64 * 2**20
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()  # (``whole`` is held now: not the tiled decode's)
        with compute_context(GPU, torch.float32, model=model):
            tiled = model.decode(z)
        tiled_peak = torch.cuda.max_memory_allocated() - base
    assert rel(tiled, whole) < 1e-5
    assert tiled_peak < whole_peak / 2


def test_dtype_auto_on_the_gpu_measures_both_reduced_precisions():
    model = model_on(GPU)
    choice = choose_dtype(model, GPU, size=64)
    assert set(choice.seconds) == {"float32", "float16"} | ({"bfloat16"} if torch.cuda.is_bf16_supported() else set())
    name = str(choice.dtype).removeprefix("torch.")
    assert choice.psnr[name] >= AUTO_MIN_PSNR
    assert all(p.device.type == "cuda" for p in model.parameters())


def test_cli_encode_and_decode_with_device_cuda(tmp_path):
    model_file = tmp_path / "m.safetensors"
    save_native(model_on(CPU), model_file)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(64, 64), (48, 80)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"{i}.png")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))

    def vqcli(*args):
        r = subprocess.run([sys.executable, "-m", "vqcli", *map(str, args)], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return r

    for device in ("cpu", "cuda"):
        vqcli("encode", images, "-o", tmp_path / f"lat-{device}", "--model", model_file, "--device", device, "--quiet")
    r = vqcli("decode", tmp_path / "lat-cuda", "-o", tmp_path / "rec", "--model", model_file, "--device", "cuda", "--dtype", "bfloat16", "--json")
    assert json.loads(r.stdout)["failed"] == 0
    from safetensors.torch import load_file

    for i in range(2):
        a = load_file(tmp_path / "lat-cpu" / f"{i}.png.safetensors")["latent"]
        b = load_file(tmp_path / "lat-cuda" / f"{i}.png.safetensors")["latent"]
        assert rel(b, a) < 1e-2  # TF32 convolutions on the GPU, as run by default
        assert Image.open(tmp_path / "rec" / f"{i}.png").size == Image.open(images / f"{i}.png").size
