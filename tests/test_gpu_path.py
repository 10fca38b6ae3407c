"""The GPU path's logic, tested on the CPU: the memory budget from the device's free memory (a
mocked ``torch.cuda.mem_get_info``), an out-of-memory error inside a batch retried in tiles with
the untiled result, a float16 overflow redone in float32, and ``--dtype auto`` measuring without
being fooled by warm-up (a fake clock). tests/test_cuda.py runs the same on a GPU."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vqcli import AutoEncoder, AutoEncoderConfig
from vqcli.pipeline.batching import Item, compute
from vqcli.pipeline.results import Job
from vqcli.speed import budget as budget_mod
from vqcli.speed import oom, precision
from vqcli.speed.context import compute_context, prepare_model

CPU = torch.device("cpu")
CONFIG = AutoEncoderConfig(
    kind="kl", ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,), z_channels=4, resolution=32
)
MB = 2**20


def tiny(seed: int = 0) -> AutoEncoder:
    torch.manual_seed(seed)
    return prepare_model(AutoEncoder(CONFIG), CPU, torch.float32)


def items(model, x: torch.Tensor) -> list[Item]:
    return [Item(Job(Path(f"{i}.png"), Path("."), Path(f"{i}.png"), Path("o")), x[i : i + 1], (0,), model)
            for i in range(x.shape[0])]


def encode(m, t):
    return m.encode(t)


def decode(m, t):
    return m.decode(t)


# --- the budget from the device's free memory ------------------------------------------------------


def test_cuda_budget_is_half_the_free_memory_counting_the_cache(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 * 2**30)
    assert budget_mod.default_budget(torch.device("cuda")) == (10 + 2) * 2**30 // 2
    # the CPU's comes from the host's memory, not the GPU's
    monkeypatch.setattr(budget_mod, "available_memory", lambda: 16 * 2**30)
    assert budget_mod.default_budget(CPU) == 4 * 2**30


# --- out of memory inside a batch ----------------------------------------------------------------


class _SmallGPU:
    """``F.conv2d`` (every convolution, whole or in bands) as on a device whose memory runs out on
    any map of more than ``pixels`` pixels: a whole full-resolution map does not fit, a band of it
    does, and so do the maps at lower resolutions (attention runs on those whole)."""

    def __init__(self, monkeypatch, pixels: int):
        self.pixels, self.failures, self.real = pixels, 0, F.conv2d
        monkeypatch.setattr(F, "conv2d", self)

    def __call__(self, x, *args, **kwargs):
        if x.shape[-2] * x.shape[-1] > self.pixels:
            self.failures += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return self.real(x, *args, **kwargs)


@pytest.mark.parametrize("op", ["encode", "decode"])
def test_out_of_memory_in_a_batch_is_retried_in_tiles_with_the_untiled_result(monkeypatch, caplog, op):
    model = tiny()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1 if op == "encode" else torch.randn(2, 4, 16, 16, generator=g)
    fn = encode if op == "encode" else decode
    with compute_context(CPU, torch.float32, model=model, budget=2**40):
        expected = fn(model, x)
    monkeypatch.setattr(oom, "MIN_BUDGET", 64 * 1024)
    gpu = _SmallGPU(monkeypatch, pixels=64 * 64 // 2)  # half the full resolution; 32 x 32 fits
    with caplog.at_level(logging.WARNING):
        results = compute(items(model, x), fn, torch.float32, budget=256 * MB)
    assert gpu.failures > 0  # it did run out, untiled
    assert [type(out) for _, out, _ in results] == [torch.Tensor, torch.Tensor]
    got = torch.cat([out for _, out, _ in results])
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    lines = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(lines) == 1 and "tiles" in lines[0]


def test_out_of_memory_even_in_the_smallest_tiles_fails_that_input_only(monkeypatch):
    model = tiny()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    monkeypatch.setattr(oom, "MIN_BUDGET", 1 * MB)
    _SmallGPU(monkeypatch, pixels=0)  # nothing fits
    (item, out, redone), = compute(items(model, x), encode, torch.float32, budget=64 * MB)
    assert not isinstance(out, torch.Tensor) and "out of memory" in str(out)


def test_budgets_shrink_by_a_quarter_down_to_the_floor(monkeypatch):
    monkeypatch.setattr(oom, "MIN_BUDGET", 1 * MB)
    tried = []

    def run(budget):
        tried.append(budget)
        raise torch.OutOfMemoryError("out of memory (simulated)")

    with pytest.raises(torch.OutOfMemoryError):
        oom.retry_in_tiles(run, 100 * MB, device=CPU)
    assert tried == [100 * MB, 25 * MB, 25 * MB // 4, 25 * MB // 16, 1 * MB]


def test_other_errors_are_not_retried():
    tried = []

    def run(budget):
        tried.append(budget)
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        oom.retry_in_tiles(run, 100 * MB, device=CPU)
    assert tried == [100 * MB]


# --- float16 overflow: redone in float32 ------------------------------------------------------------


def test_a_float16_overflow_is_redone_in_float32():
    """As SDXL's VAE in float16: the first convolution's output passes 65504 (weights x1e6);
    GroupNorm follows, so float32 absorbs the scale."""
    model = tiny()
    with torch.no_grad():
        model.encoder.conv_in.weight.mul_(1e6)
        model.encoder.conv_in.bias.mul_(1e6)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with compute_context(CPU, torch.float16, model=model):
        assert not torch.isfinite(model.encode(x)).all()  # it does overflow
    results = compute(items(model, x), encode, torch.float16)
    assert [redone for _, _, redone in results] == [True, True]
    for i, (_, out, _) in enumerate(results):
        with compute_context(CPU, torch.float32, model=model):
            assert torch.equal(out, model.encode(x[i : i + 1]))


# --- --dtype auto: measured, not fooled by warm-up -------------------------------------------------


class _FakeClock:
    """Seconds that pass only inside the model: ``cost(dtype, n)`` for a precision's n-th call."""

    def __init__(self, model, cost):
        self.now, self.calls, self.cost = 0.0, {}, cost
        model.encoder.register_forward_pre_hook(self._tick)  # (once an encode + decode)

    def _tick(self, module, args):
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32
        n = self.calls[dtype] = self.calls.get(dtype, 0) + 1
        self.now += self.cost(dtype, n)

    def __call__(self) -> float:
        return self.now


def test_auto_measures_bfloat16_on_any_cpu():
    assert torch.bfloat16 in precision.auto_candidates(CPU)


def test_auto_is_not_fooled_by_a_slow_first_call():
    """bfloat16's first call pays a 50x warm-up, float32's none; in steady state bfloat16 is
    twice as fast: it is chosen."""
    model = tiny()
    clock = _FakeClock(model, lambda d, n: 1.0 if d == torch.float32 else (25.0 if n == 1 else 0.5))
    choice = precision.choose_dtype(model, CPU, candidates=[torch.bfloat16], size=32, clock=clock)
    assert choice.dtype == torch.bfloat16
    assert choice.seconds == {"float32": 1.0, "bfloat16": 0.5}


def test_auto_is_not_fooled_by_float32_warming_up_first():
    """float32, measured first, pays a cold start; in steady state it is the faster: float32."""
    model = tiny()
    clock = _FakeClock(model, lambda d, n: (30.0 if n == 1 else 1.0) if d == torch.float32 else 1.5)
    assert precision.choose_dtype(model, CPU, candidates=[torch.bfloat16], size=32, clock=clock).dtype == torch.float32


def test_auto_keeps_float32_when_the_gain_is_within_noise():
    model = tiny()
    clock = _FakeClock(model, lambda d, n: 1.0 if d == torch.float32 else 0.97)
    assert precision.choose_dtype(model, CPU, candidates=[torch.bfloat16], size=32, clock=clock).dtype == torch.float32


def test_auto_times_with_the_heap_kept_as_in_a_run():
    from vqcli.speed import heap

    if heap._LIBC is None:
        pytest.skip("not glibc: the heap is not tuned")
    model = tiny()
    depths = []
    model.encoder.register_forward_pre_hook(lambda m, a: depths.append(heap._depth))
    precision.choose_dtype(model, CPU, candidates=[torch.bfloat16], size=32)
    assert depths and all(d > 0 for d in depths)
    assert heap._depth == 0
