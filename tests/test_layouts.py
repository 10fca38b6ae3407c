"""Key renaming between the original (ldm / taming) and diffusers layouts, as pure functions."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_KL, TINY_VQ
from hypothesis import given, settings
from hypothesis import strategies as st

from vqcli.checkpoints.layouts import (
    detect_layout,
    key_to_diffusers,
    key_to_original,
    select_autoencoder,
    strip_prefixes,
    to_diffusers,
    to_original,
)
from vqcli.model.autoencoder import AutoEncoder
from vqcli.model.config import AutoEncoderConfig

# Hand-written correspondences for a 3-level model (the decoder's indices reverse: up.i <-> up_blocks.2-i).
KNOWN = [
    ("encoder.conv_in.weight", "encoder.conv_in.weight"),
    ("encoder.down.0.block.1.norm1.weight", "encoder.down_blocks.0.resnets.1.norm1.weight"),
    ("encoder.down.1.block.0.nin_shortcut.bias", "encoder.down_blocks.1.resnets.0.conv_shortcut.bias"),
    ("encoder.down.1.attn.0.norm.bias", "encoder.down_blocks.1.attentions.0.group_norm.bias"),
    ("encoder.down.1.attn.0.q.weight", "encoder.down_blocks.1.attentions.0.to_q.weight"),
    ("encoder.down.1.attn.0.k.bias", "encoder.down_blocks.1.attentions.0.to_k.bias"),
    ("encoder.down.1.attn.0.v.weight", "encoder.down_blocks.1.attentions.0.to_v.weight"),
    ("encoder.down.1.attn.0.proj_out.weight", "encoder.down_blocks.1.attentions.0.to_out.0.weight"),
    ("encoder.down.0.downsample.conv.weight", "encoder.down_blocks.0.downsamplers.0.conv.weight"),
    ("encoder.mid.block_1.conv2.weight", "encoder.mid_block.resnets.0.conv2.weight"),
    ("encoder.mid.block_2.norm2.bias", "encoder.mid_block.resnets.1.norm2.bias"),
    ("encoder.mid.attn_1.proj_out.bias", "encoder.mid_block.attentions.0.to_out.0.bias"),
    ("encoder.norm_out.weight", "encoder.conv_norm_out.weight"),
    ("encoder.conv_out.bias", "encoder.conv_out.bias"),
    ("decoder.mid.attn_1.norm.weight", "decoder.mid_block.attentions.0.group_norm.weight"),
    ("decoder.up.2.block.0.conv1.weight", "decoder.up_blocks.0.resnets.0.conv1.weight"),
    ("decoder.up.0.block.2.nin_shortcut.weight", "decoder.up_blocks.2.resnets.2.conv_shortcut.weight"),
    ("decoder.up.1.attn.2.q.bias", "decoder.up_blocks.1.attentions.2.to_q.bias"),
    ("decoder.up.2.upsample.conv.weight", "decoder.up_blocks.0.upsamplers.0.conv.weight"),
    ("decoder.up.1.upsample.conv.bias", "decoder.up_blocks.1.upsamplers.0.conv.bias"),
    ("decoder.norm_out.bias", "decoder.conv_norm_out.bias"),
    ("quant_conv.weight", "quant_conv.weight"),
    ("post_quant_conv.bias", "post_quant_conv.bias"),
    ("quantize.embedding.weight", "quantize.embedding.weight"),
]


@pytest.mark.parametrize("original,diffusers", KNOWN)
def test_known_keys_rename_both_ways(original, diffusers):
    assert key_to_diffusers(original, 3) == diffusers
    assert key_to_original(diffusers, 3) == original


@pytest.mark.parametrize(
    "legacy,original",
    [
        ("encoder.mid_block.attentions.0.query.weight", "encoder.mid.attn_1.q.weight"),
        ("encoder.mid_block.attentions.0.key.bias", "encoder.mid.attn_1.k.bias"),
        ("decoder.mid_block.attentions.0.value.weight", "decoder.mid.attn_1.v.weight"),
        ("decoder.up_blocks.0.attentions.1.proj_attn.bias", "decoder.up.3.attn.1.proj_out.bias"),
    ],
)
def test_legacy_diffusers_attention_names_are_accepted(legacy, original):
    assert key_to_original(legacy, 4) == original


def test_unknown_keys_pass_through_unchanged():
    for key in ("encoder.something.weight", "model.diffusion_model.input_blocks.0.0.weight", "decoder.up.0.foo.bar"):
        assert key_to_diffusers(key, 3) == key
        assert key_to_original(key, 3) == key


def meta_state(config: AutoEncoderConfig) -> dict[str, torch.Tensor]:
    """An AutoEncoder's state dict with shapes but no data (fast to build for any size)."""
    with torch.device("meta"):
        return AutoEncoder(config).state_dict()


def test_state_dict_round_trip_matches_diffusers_keys_and_shapes(make_diffusers):
    """vqcli -> diffusers names equal diffusers' own state dict, keys and shapes; and back again."""
    for config in (TINY_KL, TINY_VQ):
        reference = make_diffusers(config).state_dict()
        ours = {k: torch.randn(v.shape) for k, v in AutoEncoder(config).state_dict().items()}
        converted = to_diffusers(ours)
        assert sorted(converted) == sorted(reference)
        assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in reference.items()}
        back = to_original(converted)
        assert sorted(back) == sorted(ours)
        assert all(torch.equal(back[k], ours[k]) for k in ours)
        assert all(back[k].shape == ours[k].shape for k in ours)


def test_attention_projections_change_shape_and_nothing_else():
    q = torch.randn(64, 64, 1, 1)
    state = {"encoder.mid.attn_1.q.weight": q, "encoder.mid.attn_1.q.bias": torch.randn(64)}
    d = to_diffusers(state)
    assert d["encoder.mid_block.attentions.0.to_q.weight"].shape == (64, 64)
    assert torch.equal(d["encoder.mid_block.attentions.0.to_q.weight"], q[:, :, 0, 0])
    assert d["encoder.mid_block.attentions.0.to_q.bias"].shape == (64,)
    # original-layout files whose projections were saved as matrices are normalised to 1x1 convs
    fixed = to_original({"encoder.mid.attn_1.q.weight": q[:, :, 0, 0].clone()})
    assert fixed["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert torch.equal(fixed["encoder.mid.attn_1.q.weight"], q)


def test_to_original_leaves_original_layout_alone():
    state = {k: torch.zeros(1) for k, _ in KNOWN if not k.endswith(("q.weight", "v.weight", "proj_out.weight"))}
    assert to_original(state).keys() == state.keys()


def test_mixed_layouts_that_collide_are_an_error():
    with pytest.raises(ValueError, match="encoder.norm_out.weight"):
        to_original({"encoder.norm_out.weight": torch.ones(1), "encoder.conv_norm_out.weight": torch.ones(1)})


@settings(max_examples=25, deadline=None)
@given(
    levels=st.integers(1, 5),
    blocks=st.integers(1, 3),
    attn=st.sets(st.integers(0, 4)),
    kind=st.sampled_from(["kl", "vq"]),
    quant=st.booleans(),
)
def test_round_trip_for_any_architecture(levels, blocks, attn, kind, quant):
    resolution = 64
    config = AutoEncoderConfig(
        kind=kind,
        ch=32,
        ch_mult=tuple(range(1, levels + 1)),
        num_res_blocks=blocks,
        attn_resolutions=tuple(resolution >> i for i in attn if i < levels),
        z_channels=4,
        n_embed=16 if kind == "vq" else 0,
        use_quant_conv=quant,
        use_post_quant_conv=quant,
        resolution=resolution,
    )
    state = meta_state(config)
    diffusers = to_diffusers(state)
    assert detect_layout(diffusers) == "diffusers"
    assert detect_layout(state) == "original"
    assert len(diffusers) == len(state)  # renaming is one-to-one
    back = to_original(diffusers)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in state.items()}


def test_detect_layout():
    assert detect_layout(["encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight"]) == "original"
    assert detect_layout(["encoder.down_blocks.0.resnets.0.conv1.weight"]) == "diffusers"
    assert detect_layout(["encoder.conv_norm_out.weight"]) == "diffusers"
    assert detect_layout(["encoder.layers.0.weight", "decoder.layers.3.weight"]) is None  # TAESD
    assert detect_layout(["model.diffusion_model.out.0.weight"]) is None
    assert detect_layout(["encoder.down.0.block.0.conv1.weight", "encoder.down_blocks.0.resnets.0.conv1.weight"]) is None
    assert detect_layout([]) is None


def test_select_autoencoder_strips_model_prefixes_and_ignores_the_rest():
    keys = [
        "model.diffusion_model.input_blocks.0.0.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "first_stage_model.encoder.conv_in.weight",
        "first_stage_model.quant_conv.bias",
        "first_stage_model.loss.logvar",
        "model_ema.decay",
    ]
    sel = select_autoencoder(keys)
    assert sel.prefix == "first_stage_model."
    assert sel.keys == {
        "encoder.conv_in.weight": "first_stage_model.encoder.conv_in.weight",
        "quant_conv.bias": "first_stage_model.quant_conv.bias",
    }
    assert sorted(sel.ignored) == sorted(set(keys) - set(sel.keys.values()))


def test_select_autoencoder_vae_prefix_and_bare_files():
    sel = select_autoencoder(["vae.decoder.conv_out.weight", "transformer.x.weight"])
    assert sel.prefix == "vae." and list(sel.keys) == ["decoder.conv_out.weight"]
    assert sel.ignored == ("transformer.x.weight",)

    bare = [
        "encoder.conv_in.weight",
        "loss.discriminator.main.0.weight",
        "loss.perceptual_loss.net.slice1.0.weight",
        "model_ema.encoderconv_inweight",
        "model_ema.decay",
        "extra.w",
    ]
    sel = select_autoencoder(bare)
    assert sel.prefix == ""
    # loss.* and model_ema.* are documented as ignored; anything else unknown stays, for strict loading to report
    assert sorted(sel.keys) == ["encoder.conv_in.weight", "extra.w"]
    assert len(sel.ignored) == 4


def test_strip_prefixes_returns_the_same_tensor_objects():
    t = torch.randn(3)
    state, ignored = strip_prefixes({"first_stage_model.decoder.conv_in.bias": t, "model.x": torch.zeros(1)})
    assert state["decoder.conv_in.bias"] is t
    assert ignored == ("model.x",)
