"""Numerical parity with an independent implementation: diffusers' AutoencoderKL and VQModel.

Each test builds a diffusers model with random weights (norms and biases too), copies the weights
into vqcli through ``vqcli.layouts``, and compares at fp32: max abs difference <= 1e-4 on tensors,
identical VQ indices. Inputs are non-square throughout.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_KL, TINY_VQ, randomize_

from vqcli import AttnBlock, Decoder, Encoder
from vqcli.checkpoints.layouts import to_original
from vqcli.model.autoencoder import load_strict

TOL = 1e-4


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    diff = max_diff(a, b)
    assert diff <= tol, f"max abs difference {diff:.3g} > {tol} (values up to {b.abs().max().item():.3g})"
    assert b.float().std() > 1e-3, "reference output is (nearly) constant: the comparison would prove nothing"


def part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


KL_VARIANTS = {
    "attention-inner-level": TINY_KL,
    "no-resample-conv": TINY_KL.replace(resamp_with_conv=False),
    "no-quant-convs": TINY_KL.replace(use_quant_conv=False, use_post_quant_conv=False),
    "three-levels-two-blocks": TINY_KL.replace(ch_mult=(1, 1, 2), num_res_blocks=2, attn_resolutions=(32, 8)),
    "no-middle-attention": TINY_KL.replace(mid_attention=False),
}


@pytest.mark.parametrize("config", KL_VARIANTS.values(), ids=KL_VARIANTS.keys())
@torch.no_grad()
def test_kl_encoder_moments_and_decoder_output_match_diffusers(config, make_diffusers, make_twin, images):
    dmodel = make_diffusers(config, seed=1)
    model = make_twin(dmodel, config)
    x = images(2, 16, 24, seed=2)

    dist = dmodel.encode(x).latent_dist
    assert_close(model.encode_moments(x), dist.parameters)
    assert_close(model.encode(x), dist.mode())

    z = dist.mean + 0.5 * torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(3))
    assert_close(model.decode(z), dmodel.decode(z).sample)


@torch.no_grad()
def test_vq_moments_indices_and_decoder_match_diffusers(make_diffusers, make_twin, seed_codebook, images):
    config = TINY_VQ
    dmodel = make_diffusers(config, seed=4)
    x = images(2, 20, 28, seed=5)
    seed_codebook(dmodel, x)
    model = make_twin(dmodel, config)

    h = dmodel.encode(x).latents
    assert_close(model.encode_moments(x), h)
    _, _, (_, _, flat_indices) = dmodel.quantize(h)
    expected = flat_indices.reshape(h.shape[0], h.shape[2], h.shape[3])
    indices = model.encode_indices(x)
    assert torch.equal(indices, expected)
    assert indices.unique().numel() >= 16, "too few distinct codes to test the quantiser"

    reference = dmodel.decode(h).sample  # diffusers quantises inside decode
    assert_close(model.decode(model.encode(x)), reference)
    assert_close(model.decode_indices(indices), reference)


@torch.no_grad()
def test_encoder_without_double_z_matches_diffusers():
    from diffusers.models.autoencoders.vae import Encoder as DiffusersEncoder

    config = TINY_KL
    dencoder = DiffusersEncoder(
        in_channels=3,
        out_channels=config.z_channels,
        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        double_z=False,
    )
    randomize_(dencoder, seed=6).eval()
    encoder = Encoder(**config.coder_kwargs(), double_z=False).eval()
    state = part(to_original({f"encoder.{k}": v for k, v in dencoder.state_dict().items()}), "encoder.")
    load_strict(encoder, state, "diffusers encoder")

    x = torch.randn(1, 3, 16, 36, generator=torch.Generator().manual_seed(7))
    out = encoder(x)
    assert out.shape == (1, config.z_channels, 4, 9)
    assert_close(out, dencoder(x))


@torch.no_grad()
def test_decoder_give_pre_end_matches_diffusers_input_to_conv_norm_out(make_diffusers):
    config = TINY_KL
    dmodel = make_diffusers(config, seed=8)
    decoder = Decoder(**config.coder_kwargs(), give_pre_end=True).eval()
    load_strict(decoder, part(to_original(dmodel.state_dict()), "decoder."), "diffusers decoder")

    captured = {}
    hook = dmodel.decoder.conv_norm_out.register_forward_pre_hook(lambda module, args: captured.update(h=args[0]))
    try:
        z = torch.randn(2, config.z_channels, 5, 3, generator=torch.Generator().manual_seed(9))
        dmodel.decoder(z)
    finally:
        hook.remove()
    pre_end = decoder(z)
    assert pre_end.shape == (2, config.ch * config.ch_mult[0], 20, 12)
    assert_close(pre_end, captured["h"])


@torch.no_grad()
def test_comparison_detects_mapping_mistakes(make_diffusers, make_twin, images):
    """The parity checks above can fail: small mapping errors give differences far above the tolerance."""
    config = TINY_KL
    dmodel = make_diffusers(config, seed=10)
    x = images(1, 16, 24, seed=11)
    reference = dmodel.encode(x).latent_dist.parameters
    z = reference[:, : config.z_channels]
    reference_out = dmodel.decode(z).sample

    def mutated(change) -> "torch.nn.Module":
        model = make_twin(dmodel, config)
        state = model.state_dict()
        change(state)
        model.load_state_dict(state)
        return model

    def swap(a, b):
        def change(state):
            state[a], state[b] = state[b].clone(), state[a].clone()

        return change

    def reset(key, value):
        def change(state):
            state[key].fill_(value)

        return change

    encoder_mistakes = {
        "attention q/k swapped": swap("encoder.down.1.attn.0.q.weight", "encoder.down.1.attn.0.k.weight"),
        "attention norm bias left at 0": reset("encoder.down.1.attn.0.norm.bias", 0.0),
        "mid attention out bias left at 0": reset("encoder.mid.attn_1.proj_out.bias", 0.0),
        "norm_out scale left at 1": reset("encoder.norm_out.weight", 1.0),
    }
    for name, change in encoder_mistakes.items():
        assert max_diff(mutated(change).encode_moments(x), reference) > 100 * TOL, name
    decoder_mistakes = {
        "decoder levels 1 and 2 not reversed": swap("decoder.up.1.block.0.conv1.weight", "decoder.up.2.block.0.conv1.weight"),
        "resnet norm2 bias left at 0": reset("decoder.up.0.block.1.norm2.bias", 0.0),
    }
    for name, change in decoder_mistakes.items():
        assert max_diff(mutated(change).decode(z), reference_out) > 100 * TOL, name


def explicit_attention(block: AttnBlock, x: torch.Tensor) -> torch.Tensor:
    """The original formulation: softmax((q * c^-0.5) k^T) v with the (hw x hw) matrix materialised."""
    b, c, height, width = x.shape
    h = block.norm(x)
    q = (block.q(h) * c**-0.5).reshape(b, c, -1).transpose(1, 2)  # (b, hw, c)
    k = block.k(h).reshape(b, c, -1)  # (b, c, hw)
    v = block.v(h).reshape(b, c, -1)  # (b, c, hw)
    weights = torch.softmax(torch.bmm(q, k), dim=2)  # (b, hw_q, hw_k)
    out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, height, width)
    return x + block.proj_out(out)


@torch.no_grad()
def test_sdpa_attention_matches_explicit_softmax_to_fp32_rounding():
    block = randomize_(AttnBlock(64), seed=12).eval()
    # larger projections make the softmax peaked, where a scaling mistake would show most
    for proj in (block.q, block.k):
        proj.weight.mul_(4.0)
    x = torch.randn(2, 64, 12, 20, generator=torch.Generator().manual_seed(13))
    expected = explicit_attention(block, x)
    got = block(x)
    assert max_diff(got, expected) <= 2e-5
    # and the attention is doing something: it is not (close to) the identity or a plain average
    assert max_diff(got, x) > 0.1
    uniform = x + block.proj_out(block.v(block.norm(x)).mean(dim=(2, 3), keepdim=True).expand_as(x))
    assert max_diff(got, uniform) > 0.1


@torch.no_grad()
def test_sdpa_attention_matches_explicit_softmax_in_float64():
    """Same comparison in float64 with a tighter bound: the formulations agree, not just roughly."""
    block = randomize_(AttnBlock(32), seed=14).double().eval()
    x = torch.randn(1, 32, 7, 9, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    assert max_diff(block(x), explicit_attention(block, x)) <= 1e-10


def test_vqcli_and_diffusers_attention_agree_on_inner_level_shapes(make_diffusers, make_twin):
    """Sanity of the fixtures: the diffusers twin really has attention where the config puts it."""
    dmodel = make_diffusers(TINY_KL)
    assert [type(b).__name__ for b in dmodel.encoder.down_blocks] == [
        "DownEncoderBlock2D",
        "AttnDownEncoderBlock2D",
        "DownEncoderBlock2D",
    ]
    assert [type(b).__name__ for b in dmodel.decoder.up_blocks] == [
        "UpDecoderBlock2D",
        "AttnUpDecoderBlock2D",
        "UpDecoderBlock2D",
    ]
    model = make_twin(dmodel, TINY_KL)
    assert len(model.encoder.down[1].attn) == 1 and len(model.decoder.up[1].attn) == 2
