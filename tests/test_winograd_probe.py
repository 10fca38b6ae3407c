"""benchmarks/winograd_probe.py's Winograd convolution computes the 3x3 convolution it is timed
against (so the speed it reports is that of the same result)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _scripts import load_script

probe = load_script("benchmarks/winograd_probe.py")


@pytest.mark.parametrize("m, band, tolerance", [(2, 3, 1e-6), (2, 100, 1e-6), (4, 2, 2e-5), (4, 5, 2e-5)])
def test_winograd_convolution_equals_a_float64_convolution(m, band, tolerance):
    gen = torch.Generator().manual_seed(m * 10 + band)
    x = torch.randn(2, 24, 28, 20, generator=gen)  # 2 images, 28 rows: bands that do not divide them
    weight = torch.randn(16, 24, 3, 3, generator=gen) / (9 * 24) ** 0.5
    bias = torch.randn(16, generator=gen)
    reference = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    out = probe.WinogradConv(weight, bias, m, band)(x)
    assert out.shape == reference.shape and out.dtype == torch.float32
    assert float((out.double() - reference).abs().max() / reference.abs().max()) < tolerance


def test_a_map_whose_sides_are_not_tile_multiples_is_refused():
    conv = probe.WinogradConv(torch.zeros(4, 4, 3, 3), torch.zeros(4), 4, 2)
    with pytest.raises(ValueError, match="multiples of 4"):
        conv(torch.zeros(1, 4, 10, 12))
