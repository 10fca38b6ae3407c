"""Reduced precision as CUDA runs it, tested on the CPU: a copy of the model with its weights cast
(``vqcli.speed.context.compute_model``), forced here by making ``casts_weights`` say yes for
every reduced dtype. The copy's dtypes, the original left alone, the copy kept and remade, the
guard against a float32 model, and encode and decode through the pipeline against the float32
model: whole, tiled, VQ indices, and a float16 overflow redone in float32. tests/test_cuda.py
runs the same path on a GPU."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_KL, TINY_VQ, randomize_

from vqcli.model.autoencoder import AutoEncoder
from vqcli.pipeline import batching
from vqcli.pipeline.batching import Item, compute
from vqcli.pipeline.decode import decode_array
from vqcli.pipeline.encode import encode_array
from vqcli.pipeline.features import extract_features
from vqcli.pipeline.results import Job
from vqcli.speed import context
from vqcli.speed.context import compute_context, compute_model, memory_format_for, prepare_model
from vqcli.speed.precision import choose_dtype

CPU = torch.device("cpu")
BF16 = torch.bfloat16
# the parameters that stay float32 in a cast copy, written out here rather than taken from vqcli
FLOAT32_KL = {f"{layer}.{p}" for layer in ("encoder.conv_out", "quant_conv", "post_quant_conv", "decoder.conv_out")
              for p in ("weight", "bias")}
FLOAT32_VQ = FLOAT32_KL | {"quantize.embedding.weight"}


@pytest.fixture
def cast_like_cuda(monkeypatch):
    """Every reduced precision runs a cast copy, as on CUDA."""
    monkeypatch.setattr(context, "casts_weights", lambda device, dtype: dtype != torch.float32)


def model_of(config, seed: int = 0) -> AutoEncoder:
    return prepare_model(randomize_(AutoEncoder(config), seed), CPU, torch.float32)


def picture(size: int = 64, seed: int = 1) -> np.ndarray:
    """A smooth (size, size, 3) [0, 1] image with a little texture (what the models are made for)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    img = torch.stack([xx, yy, 1 - xx * yy], dim=-1) * 0.8 + 0.2 * torch.rand(size, size, 3, generator=g)
    return img.clamp(0, 1).numpy()


def psnr(a, b) -> float:
    """dB between two images in [0, 1]."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else -10 * math.log10(mse)


# --- which model runs ----------------------------------------------------------------------------


def test_only_reduced_precision_on_cuda_casts_the_weights():
    cuda = torch.device("cuda")
    assert context.casts_weights(cuda, torch.bfloat16) and context.casts_weights(cuda, torch.float16)
    assert not context.casts_weights(cuda, torch.float32)
    assert not context.casts_weights(CPU, torch.bfloat16)
    model = model_of(TINY_KL)
    assert compute_model(model, CPU, torch.bfloat16) is model  # the CPU keeps autocast


def test_memory_format_channels_last_only_for_reduced_precision_on_the_cpu():
    assert memory_format_for(torch.bfloat16) == memory_format_for(torch.bfloat16, CPU) == torch.channels_last
    assert memory_format_for(torch.float32, CPU) == torch.contiguous_format
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert memory_format_for(dtype, torch.device("cuda")) == torch.contiguous_format


@pytest.mark.parametrize("config, float32", [(TINY_KL, FLOAT32_KL), (TINY_VQ, FLOAT32_VQ)], ids=["kl", "vq"])
def test_the_copy_is_in_the_reduced_dtype_but_for_the_output_layers(cast_like_cuda, config, float32):
    model = model_of(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runner = compute_model(model, CPU, torch.float16)
    dtypes = {name: p.dtype for name, p in runner.named_parameters()}
    assert {name for name, d in dtypes.items() if d == torch.float32} == float32
    assert {d for name, d in dtypes.items() if name not in float32} == {torch.float16}
    assert not runner.training and not any(p.requires_grad for p in runner.parameters())
    # the original: float32, its values and its layers as they were
    assert all(p.dtype == torch.float32 for p in model.parameters())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    for name, p in runner.named_parameters():
        assert torch.equal(p, before[name].to(p.dtype))
        assert p.data_ptr() != model.get_parameter(name).data_ptr()


def test_the_copy_is_kept_and_remade_when_the_weights_change(cast_like_cuda):
    model = model_of(TINY_KL)
    first = compute_model(model, CPU, BF16)
    assert compute_model(model, CPU, BF16) is first
    with torch.no_grad():
        model.decoder.conv_in.weight.mul_(2.0)  # in place: the same tensor, a new version
    second = compute_model(model, CPU, BF16)
    assert second is not first
    assert torch.equal(second.decoder.conv_in.weight, model.decoder.conv_in.weight.to(BF16))
    assert compute_model(model, CPU, torch.float16) is not second  # another dtype, another copy
    assert compute_model(model, CPU, torch.float32) is model


def test_a_float32_model_where_weights_are_cast_is_refused(cast_like_cuda):
    model = model_of(TINY_KL)
    with pytest.raises(ValueError, match="compute_model"):
        compute_context(CPU, BF16, model=model)
    with compute_context(CPU, BF16, model=compute_model(model, CPU, BF16)):
        assert not torch.is_autocast_enabled("cpu")  # the weights are in bfloat16 already


def test_groupnorm_in_reduced_precision_computes_in_float32():
    """What ``Normalize`` relies on: the kernel normalises in float32 and rounds only the result."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 64, 16, 16, generator=g) * 40 + 7).to(BF16)
    norm = randomize_(torch.nn.GroupNorm(32, 64, eps=1e-6), 1)
    expected = F.group_norm(x.float(), 32, norm.weight.to(BF16).float(), norm.bias.to(BF16).float(), 1e-6)
    got = norm.to(BF16)(x)
    assert got.dtype == BF16
    ulp = expected.abs().clamp_min(2**-20) * 2**-7  # one bfloat16 rounding of the float32 result
    assert bool(((got.float() - expected).abs() <= ulp).all())


# --- through the pipeline ------------------------------------------------------------------------


class _Spy:
    """``batching.compute_model`` that records each model it hands out, and the dtypes flowing
    into and out of its layers (forward hooks on the cast copies)."""

    def __init__(self, monkeypatch):
        self.real, self.runners, self.seen = batching.compute_model, [], {}
        monkeypatch.setattr(batching, "compute_model", self)

    def __call__(self, model, device, dtype):
        runner = self.real(model, device, dtype)
        if runner is not model and not any(r is runner for r in self.runners):
            self.runners.append(runner)
            for name in ("encoder.conv_in", "encoder.down.0.block.0.conv1", "encoder.conv_out", "decoder.conv_in",
                         "decoder.mid.block_1.conv1", "decoder.conv_out"):
                runner.get_submodule(name).register_forward_hook(
                    lambda m, i, o, name=name: self.seen.setdefault(name, set()).add((i[0].dtype, o.dtype)))
        return runner


def test_encode_and_decode_with_the_cast_copy_stay_close_to_float32(cast_like_cuda, monkeypatch):
    model = model_of(TINY_KL)
    rgb = picture()
    z32 = encode_array(model, rgb)
    y32 = decode_array(model, z32, 64, 64)
    spy = _Spy(monkeypatch)
    z = encode_array(model, rgb, dtype=BF16)
    y = decode_array(model, z, 64, 64, dtype=BF16)
    assert len(spy.runners) == 1  # one copy, for the encode and the decode
    assert spy.seen["encoder.conv_in"] == {(BF16, BF16)}  # (cast on the way in: the image is float32)
    assert spy.seen["encoder.down.0.block.0.conv1"] == spy.seen["decoder.mid.block_1.conv1"] == {(BF16, BF16)}
    assert spy.seen["encoder.conv_out"] == spy.seen["decoder.conv_out"] == {(torch.float32, torch.float32)}
    assert spy.seen["decoder.conv_in"] == {(BF16, BF16)}
    assert z.dtype == torch.float32 and z.shape == z32.shape
    assert float((z - z32).abs().max()) < 0.05 * float(z32.abs().max())
    assert psnr(y, y32) > 30
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_vq_indices_with_the_cast_copy_mostly_agree_with_float32(cast_like_cuda):
    model = model_of(TINY_VQ)
    rgb = picture()
    expected = encode_array(model, rgb)
    got = encode_array(model, rgb, dtype=BF16)
    assert got.dtype == torch.int64 and got.shape == expected.shape
    assert float((got == expected).float().mean()) > 0.9
    assert decode_array(model, got, 64, 64, dtype=BF16).shape == (64, 64, 3)


def test_tiled_and_untiled_agree_with_the_cast_copy(cast_like_cuda, caplog):
    """Each coder on the same input, whole and in bands of a 64 KB budget: they differ by bfloat16
    rounding only (the bands' GroupNorm rounds once at another point)."""
    model = model_of(TINY_KL)
    rgb = picture(96)
    z_whole = encode_array(model, rgb, dtype=BF16, budget=2**40)
    y_whole = decode_array(model, z_whole, 96, 96, dtype=BF16, budget=2**40)
    with caplog.at_level(logging.DEBUG, logger="vqcli.speed.tiling"):
        z_tiled = encode_array(model, rgb, dtype=BF16, budget=2**16)
        banded_encode = sum("in bands" in r.getMessage() for r in caplog.records)
        y_tiled = decode_array(model, z_whole, 96, 96, dtype=BF16, budget=2**16)
        banded_decode = sum("in bands" in r.getMessage() for r in caplog.records) - banded_encode
    assert banded_encode > 0 and banded_decode > 0  # both did run in bands
    assert z_tiled.dtype == torch.float32
    assert float((z_tiled - z_whole).abs().max()) < 0.03 * float(z_whole.abs().max())
    assert psnr(y_tiled, y_whole) > 40


def test_features_come_from_the_cast_copy(cast_like_cuda):
    model = model_of(TINY_KL)
    rgb = picture(32)
    reference = extract_features(model, rgb)
    features = extract_features(model, rgb, dtype=BF16)
    assert list(features) == list(reference)
    assert all(t.dtype == torch.float32 for t in features.values())
    last = features["decoder.conv_out"]
    assert float((last - reference["decoder.conv_out"]).abs().max()) < 0.1 * float(last.abs().max())


def test_dtype_auto_measures_the_cast_copy_and_leaves_the_model_float32(cast_like_cuda):
    model = model_of(TINY_KL)
    choice = choose_dtype(model, CPU, candidates=[BF16], size=32, rounds=1)
    assert choice.psnr["bfloat16"] > 30
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_a_float16_overflow_is_redone_with_the_float32_model(cast_like_cuda):
    """As SDXL's VAE in float16: the first convolution's output passes float16's largest value
    (weights x1e6); a GroupNorm follows, so float32 absorbs the scale."""
    model = model_of(TINY_KL)
    with torch.no_grad():
        model.encoder.conv_in.weight.mul_(1e6)
        model.encoder.conv_in.bias.mul_(1e6)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    runner = compute_model(model, CPU, torch.float16)
    with compute_context(CPU, torch.float16, model=runner):
        assert not torch.isfinite(runner.encode(x)).all()  # it does overflow

    def encode(m, t):
        return m.encode(t)

    items = [Item(Job(Path(f"{i}.png"), Path("."), Path(f"{i}.png"), Path("o")), x[i : i + 1], (0,), model)
             for i in range(2)]
    results = compute(items, encode, torch.float16)
    assert [redone for _, _, redone in results] == [True, True]
    for i, (_, out, _) in enumerate(results):
        with compute_context(CPU, torch.float32, model=model):
            assert torch.equal(out, model.encode(x[i : i + 1]))
