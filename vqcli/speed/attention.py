"""Attention in bands of queries: the same result as ``AttnBlock`` whole, in bounded memory and
bounded time per step.

``AttnBlock`` mixes every position with every other, so its keys and values are needed whole; its
queries are not. Each query's output depends only on that query and the whole keys and values
(the softmax runs along one query's row), so the block's output can be computed a band of map rows
at a time: the query projection, the product, ``proj_out`` and the residual of those rows only.

Two reasons to band:

- memory: whole, the block holds about ``WHOLE_MAPS`` maps of its input's size at once (input,
  q, k, v, the product, the output); in bands it holds ``BANDED_MAPS`` (input, its normalised copy,
  k, v, output) plus one band's queries and products;
- time: one product over N positions is one call of N^2 c multiply-adds that nothing can
  interrupt (a 512x512 latent map with 64 channels: about 10^13, minutes on a CPU core), and a
  signal (Ctrl-C, SIGTERM) is only acted on between calls. Bands of at most ``BAND_WORK``
  multiply-adds each (``GPU_BAND_WORK`` on a GPU) keep every call short, so a stop asked for is
  honoured within a fraction of a second of the band under way.

The normalisation keeps its whole-map statistics (it runs on the whole input), so the result
equals the whole block's up to float summation order (tests/test_attention.py; on an H200, float32
bands of 1, 5 and 16 rows were within 5e-7 of the whole block, bfloat16 identical).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vqcli.model.blocks import AttnBlock

WHOLE_MAPS = 6  # maps of the input's size the whole block holds at its peak
BANDED_MAPS = 5  # ... and held in bands, before the band itself
BAND_WORK = 2**30  # the most multiply-adds of one band's product (about 0.1-0.5 s on one CPU core)
# ... on a GPU (about 10 ms on an H200; bands of CPU size there made a 128x128 map with 512 channels
# 30 times slower than whole: 0.60 s against 0.019 s)
GPU_BAND_WORK = 2**40


def band_rows(shape: tuple[int, ...], itemsize: int, budget: int | None, work_limit: int = BAND_WORK) -> int:
    """The map rows of one band for an input of ``shape`` (b, c, h, w): all of them (no bands) when
    the whole block fits ``budget`` bytes and its product is at most ``work_limit`` multiply-adds."""
    b, c, h, w = shape
    n = h * w
    whole_bytes = WHOLE_MAPS * b * c * n * itemsize
    work = b * n * n * c
    if work <= work_limit and (budget is None or whole_bytes <= budget):
        return h
    rows = max(1, work_limit // max(1, b * w * n * c))  # bounded time
    if budget is not None:
        left = budget - BANDED_MAPS * b * c * n * itemsize
        # a band holds its queries, their products, proj_out's output: three band-sized maps
        per_row = 3 * b * c * w * itemsize
        rows = min(rows, max(1, left // per_row))
    return int(min(h, rows))


def banded_attention(attn: AttnBlock, x: torch.Tensor, rows: int) -> torch.Tensor:
    """``attn(x)`` computed ``rows`` map rows of queries at a time (see the module's docstring)."""
    b, c, height, width = x.shape

    def tokens(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, 1, c, -1).transpose(2, 3).contiguous()

    h = attn.norm(x)
    k = tokens(attn.k(h))
    v = tokens(attn.v(h))
    y = torch.empty_like(x)
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        q = tokens(attn.q(h[:, :, top:bottom]).mul_(c**-0.5))
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        del q
        out = out.transpose(2, 3).reshape(b, c, bottom - top, width)
        y[:, :, top:bottom] = x[:, :, top:bottom] + attn.proj_out(out)
    return y


def bounded_attention(attn: AttnBlock, x: torch.Tensor, budget: int | None) -> torch.Tensor:
    """``attn(x)``: whole where it fits ``budget`` bytes and is quick, else in bands of queries."""
    work_limit = BAND_WORK if x.device.type == "cpu" else GPU_BAND_WORK
    rows = band_rows(tuple(x.shape), x.element_size(), budget, work_limit)
    if rows >= x.shape[2]:
        return AttnBlock.forward(attn, x)
    return banded_attention(attn, x, rows)
