"""Training under bfloat16 autocast on a CPU with AMX runs its maps channels-last (faster there; on
a CPU without AMX it stays NCHW, faster there) and gives what the NCHW path gives; the EMA, which is
validated and saved, stays NCHW. (benchmarks/train_speed.py measures the two side by side.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vqcli import AutoEncoderConfig
from vqcli import train as train_module
from vqcli.checkpoints.native import load_native
from vqcli.model.blocks import Normalize, normalize
from vqcli.train import ImageBank, Trainer, TrainOptions, train

from conftest import photo_crops

CPU = torch.device("cpu")
CL = torch.channels_last


@pytest.fixture(scope="module")
def bank(tmp_path_factory) -> ImageBank:
    folder = photo_crops(tmp_path_factory.mktemp("photos"), "astronaut.png", [(0, 0), (200, 150), (380, 380)], 96)
    return ImageBank(sorted(folder.iterdir()))


def _map(fmt: torch.memory_format) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 12, 10, generator=gen) * 3.0 + 1.0
    return x.to(torch.bfloat16).contiguous(memory_format=fmt).requires_grad_()


def _norm() -> torch.nn.GroupNorm:
    norm = Normalize(64)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        norm.weight.copy_(torch.rand(64, generator=gen) + 0.5)
        norm.bias.copy_(torch.randn(64, generator=gen))
    return norm


def test_a_bfloat16_channels_last_map_in_training_is_normalised_in_float32():
    norm, x = _norm(), _map(CL)
    out = normalize(norm, x)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=CL)
    reference = F.group_norm(x.detach().float().contiguous(), 32, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(out.contiguous(), reference, rtol=1e-4, atol=1e-4)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    out.backward(grad)
    x_ref = x.detach().float().contiguous().requires_grad_()
    F.group_norm(x_ref, 32, norm.weight, norm.bias, norm.eps).backward(grad)
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.float(), x_ref.grad.to(torch.bfloat16).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("case", ["nchw", "no_grad", "inference_mode", "float32"])
def test_normalize_is_the_norm_itself_everywhere_else(case):
    norm = _norm()
    x = _map(torch.contiguous_format if case == "nchw" else CL)
    if case == "float32":
        x = x.detach().float().contiguous(memory_format=CL).requires_grad_()
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(case, torch.enable_grad)
    with context():
        out, expected = normalize(norm, x), norm(x)
    assert out.dtype == x.dtype
    assert torch.equal(out, expected)


@pytest.fixture
def amx(monkeypatch):
    """Whether the CPU has AMX, as the trainer sees it: set by the test."""

    def set_amx(present: bool) -> None:
        monkeypatch.setattr(train_module, "cpu_has_amx", lambda: present)

    return set_amx


def _trainer(kind: str, fmt: torch.memory_format, amx) -> Trainer:
    amx(fmt == CL)
    config = AutoEncoderConfig(kind=kind, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, n_embed=64)
    trainer = Trainer(config, TrainOptions(steps=10, batch_size=2, crop=32, warmup=2, bf16=True), CPU)
    assert trainer.memory_format == fmt
    return trainer


def test_bfloat16_training_on_a_cpu_with_amx_runs_channels_last_and_keeps_the_ema_in_nchw(bank, amx):
    trainer = _trainer("kl", CL, amx)
    kernels = [p for p in trainer.model.parameters() if p.dim() == 4 and p.shape[-1] > 1]  # (1x1 ones are both)
    assert kernels and all(p.is_contiguous(memory_format=CL) and not p.is_contiguous() for p in kernels)
    start = trainer.ema.get_parameter("encoder.conv_in.weight").clone()
    for _ in range(2):
        trainer.train_step(bank)
    assert all(p.is_contiguous() for p in trainer.ema.parameters())
    assert not torch.equal(trainer.ema.get_parameter("encoder.conv_in.weight"), start)  # it follows the model
    saved = trainer.finished_model(bank).state_dict()
    assert all(t.is_contiguous() for t in saved.values())


@pytest.mark.parametrize("amx_present, bf16", [(False, True), (True, False)])
def test_without_amx_or_in_float32_training_stays_nchw(bank, amx, amx_present, bf16):
    amx(amx_present)
    config = AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)
    trainer = Trainer(config, TrainOptions(batch_size=2, crop=32, bf16=bf16), CPU)
    assert trainer.memory_format == torch.contiguous_format
    assert all(p.is_contiguous() for p in trainer.model.parameters())
    trainer.train_step(bank)
    assert all(p.is_contiguous() for p in trainer.model.parameters())


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_a_channels_last_step_computes_what_the_nchw_step_computes(bank, kind, amx, monkeypatch):
    """Same seed, same weights, same batch: the loss and the gradients of the channels-last step
    agree with those of the NCHW step (the path before) to bfloat16 precision. The gradients' norm
    is compared before the step clips it to 1."""
    norms = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(*args, **kwargs):
        norms.append(float(clip(*args, **kwargs)))
        return norms[-1]

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    results = {}
    for fmt in (torch.contiguous_format, CL):
        trainer = _trainer(kind, fmt, amx)
        progress = trainer.train_step(bank)
        grads = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
        results[fmt] = (progress.loss, grads)
    (loss_a, grad_a), (loss_b, grad_b) = results.values()
    assert loss_b == pytest.approx(loss_a, rel=2e-2)
    assert float(F.cosine_similarity(grad_a, grad_b, dim=0)) > 0.99
    assert len(norms) == 2 and norms[0] > 1.0  # (so the clipped gradients above are unit vectors)
    assert norms[1] == pytest.approx(norms[0], rel=5e-2)


def test_a_channels_last_run_resumed_from_its_checkpoint_ends_where_an_unbroken_one_does(bank, tmp_path, amx):
    """The checkpoint of a channels-last run (its weights and optimizer state in that layout) puts
    the resumed run back exactly where it stopped."""
    amx(True)
    config = AutoEncoderConfig(kind="vq", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, n_embed=64)
    opts = TrainOptions(steps=4, batch_size=2, crop=32, warmup=2, bf16=True)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(bank.images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"p{i}.png")
    photos = sorted(folder.iterdir())
    whole, split = tmp_path / "whole.safetensors", tmp_path / "split.safetensors"
    train(photos, whole, config, opts, device=CPU)
    assert train(photos, split, config, opts, device=CPU, until=2) is None and not split.exists()
    train(photos, split, config, opts, device=CPU, resume=True)
    a, b = load_native(whole).state_dict(), load_native(split).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
