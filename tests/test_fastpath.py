"""Fast paths are explicit swaps, each equal to the original layer up to float rounding."""

from __future__ import annotations

import pytest
import torch

from vqcli import AutoEncoder, AutoEncoderConfig
from vqcli.model.blocks import Upsample
from vqcli.speed.context import prepare_model
from vqcli.speed.fastpath import PhaseUpsample, use_fast_paths

CONFIG = AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4)


def _random_upsample(channels: int, seed: int) -> Upsample:
    torch.manual_seed(seed)
    layer = Upsample(channels, with_conv=True)
    with torch.no_grad():
        layer.conv.bias.normal_()
    return layer.eval()


@pytest.mark.parametrize("seed, shape", [(0, (2, 32, 7, 9)), (1, (1, 64, 16, 16)), (2, (3, 32, 1, 5))])
def test_phase_upsample_equals_the_original(seed, shape):
    layer = _random_upsample(shape[1], seed)
    fast = PhaseUpsample.of(layer)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 10))
    with torch.no_grad():
        want = layer(x)
        got = fast(x)
        got_cl = fast(x.contiguous(memory_format=torch.channels_last))
    assert got.shape == want.shape == (shape[0], shape[1], 2 * shape[2], 2 * shape[3])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_cl, want, rtol=1e-5, atol=1e-5)
    assert got_cl.is_contiguous(memory_format=torch.channels_last)
    # a wrong phase order or kernel split would be far off, not off by rounding
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


def test_the_original_block_is_nearest_then_conv():
    layer = _random_upsample(32, 3)
    x = torch.randn(1, 32, 5, 6)
    with torch.no_grad():
        want = layer.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
        assert torch.equal(layer(x), want)


def test_the_swap_keeps_parameters_names_and_results():
    torch.manual_seed(0)
    model = AutoEncoder(CONFIG).eval()
    before = {k: v for k, v in model.state_dict().items()}
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        want = model.decode(model.encode(x))
    ups = [m for m in model.modules() if type(m) is Upsample]
    assert ups, "the test model has upsampling layers"
    use_fast_paths(model)
    assert not [m for m in model.modules() if type(m) is Upsample]
    assert len([m for m in model.modules() if isinstance(m, PhaseUpsample)]) == len(ups)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(after[k].data_ptr() == before[k].data_ptr() for k in before)  # shared, not copied
    with torch.no_grad():
        got = model.decode(model.encode(x))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_run_prepares_the_model_with_its_fast_paths():
    model = prepare_model(AutoEncoder(CONFIG), torch.device("cpu"), torch.float32)
    assert any(isinstance(m, PhaseUpsample) for m in model.modules())
    assert not any(type(m) is Upsample for m in model.modules())
