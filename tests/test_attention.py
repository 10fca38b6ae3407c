"""Attention in bands of queries (vqcli.speed.attention) equals the original block whole, and a
run's memory bound reaches every attention block: a tight budget or a long product bands it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vqcli import AutoEncoder
from vqcli.model.blocks import AttnBlock
from vqcli.speed import attention
from vqcli.speed.attention import BAND_WORK, band_rows, banded_attention
from vqcli.speed.context import compute_context

from conftest import TINY_VQ, randomize_


def _block(c: int, seed: int) -> AttnBlock:
    return randomize_(AttnBlock(c), seed).eval()


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 7, 8])
@pytest.mark.parametrize("shape", [(1, 32, 7, 5), (2, 64, 8, 8), (1, 32, 1, 9)])
def test_bands_of_queries_equal_the_whole_block(shape, rows):
    torch.manual_seed(rows)
    block = _block(shape[1], 3)
    x = torch.randn(shape)
    with torch.inference_mode():
        whole = block(x)  # the original block's math, untouched
        banded = banded_attention(block, x, rows)
    torch.testing.assert_close(banded, whole, atol=2e-5, rtol=1e-5)


def test_band_rows_follow_the_budget_and_the_work():
    shape = (1, 64, 32, 32)
    whole = attention.WHOLE_MAPS * 64 * 32 * 32 * 4
    assert band_rows(shape, 4, None) == 32  # small product, no budget: whole
    assert band_rows(shape, 4, whole) == 32
    assert band_rows(shape, 4, whole - 1) < 32  # over the budget: bands
    assert band_rows(shape, 4, 0) == 1  # nothing fits: the smallest band, never zero
    big = (1, 64, 512, 512)  # one product of 512^4 * 64 multiply-adds: bands, each within BAND_WORK
    rows = band_rows(big, 4, None)
    assert rows * 512 * (512 * 512) * 64 <= max(BAND_WORK, 512 * 512 * 512 * 64)
    gpu = (1, 512, 128, 128)  # quick on a GPU (10^11 multiply-adds): whole there, in bands on a CPU
    assert band_rows(gpu, 4, None, attention.GPU_BAND_WORK) == 128 and band_rows(gpu, 4, None) < 128


def test_a_tight_budget_bands_every_attention_with_the_unbounded_result(monkeypatch):
    """The tiny VQ model (middle attention, and attention at level 0) decoded under a budget far
    below what its attention holds whole: the products run in bands, the image is the same."""
    model = randomize_(AutoEncoder(TINY_VQ), 5).eval()
    idx = torch.randint(0, TINY_VQ.n_embed, (1, 16, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model.decode_indices(idx)
    calls = []
    real = F.scaled_dot_product_attention

    def counted(q, *a, **k):
        calls.append(q.shape[2])
        return real(q, *a, **k)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counted)
    with compute_context(torch.device("cpu"), torch.float32, model=model, budget=64 * 1024):
        got = model.decode_indices(idx)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert calls and max(calls) < 16 * 12, f"attention ran whole: queries per call {calls}"
