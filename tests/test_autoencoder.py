"""The autoencoder around the coders: config, regularisers, latent scale, training gradients, strict loading."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from vqcli import (
    AutoEncoder,
    AutoEncoderConfig,
    DiagonalGaussian,
    FileError,
    VectorQuantizer,
)
from vqcli.errors import ConfigError
from vqcli.model.autoencoder import load_strict

# attention at the inner level (nominal 8 px) as well as in the middle
TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16, z_channels=4)


def kl_model(**changes) -> AutoEncoder:
    torch.manual_seed(0)
    return AutoEncoder(AutoEncoderConfig(kind="kl", **{**TINY, **changes})).eval()


def vq_model(**changes) -> AutoEncoder:
    torch.manual_seed(0)
    model = AutoEncoder(AutoEncoderConfig(kind="vq", n_embed=8, **{**TINY, **changes})).eval()
    with torch.no_grad():  # a codebook on the scale of the encoder output, so several codes are used
        model.quantize.embedding.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    return model


def image(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- config -------------------------------------------------------------------------------------------


def test_config_defaults_derive_embed_dim_and_double_z():
    kl = AutoEncoderConfig(kind="kl", z_channels=16)
    vq = AutoEncoderConfig(kind="vq", z_channels=3, n_embed=256)
    assert (kl.embed_dim, kl.double_z, vq.embed_dim, vq.double_z) == (16, True, 3, False)
    assert AutoEncoderConfig(ch_mult=[1, 2, 4]).ch_mult == (1, 2, 4)
    assert AutoEncoderConfig(ch_mult=(1, 2, 4)).downsampling == 4


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(ch=48), r"ch\*ch_mult\[0\] = 48\*1 = 48 is not a multiple of 32"),
        (dict(ch=48, ch_mult=(2, 3)), r"^invalid autoencoder config: ch\*ch_mult\[1\] = 48\*3 = 144 is not"),
        (dict(ch=-32), "must be positive"),
        (dict(kind="kl", double_z=False), "KL model needs double_z=True"),
        (dict(kind="vq", n_embed=1), "n_embed .* at least 2"),
        (dict(kind="vq", n_embed=0), "n_embed .* at least 2"),
        (dict(kind="vq", n_embed=16, double_z=True), "VQ model has double_z=False"),
        (dict(kind="gan"), "kind must be 'kl' or 'vq'"),
        (dict(num_res_blocks=0), "num_res_blocks must be at least 1"),
        (dict(use_quant_conv=False, embed_dim=8), "without quant_conv, embed_dim must equal z_channels"),
        (dict(scale_factor=0.0), "scale_factor must not be 0"),
        (dict(dropout=1.0), r"dropout must lie in \[0, 1\)"),
        (dict(ch=64.0), "ch must be an integer"),
        (dict(ch_mult=("1", "2")), "ch_mult must be a list of integers"),
        (dict(scale_factor=float("inf")), "scale_factor must be a finite number"),
        (dict(use_quant_conv="yes"), "use_quant_conv must be true or false"),
    ],
)
def test_invalid_configs_raise_a_config_error_naming_the_problem(fields, message):
    with pytest.raises(ConfigError, match=message) as info:
        AutoEncoderConfig(**fields)
    assert str(info.value).startswith("invalid autoencoder config: ")
    assert "\n" not in str(info.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        AutoEncoderConfig(ch=40, num_res_blocks=0, kind="vq", n_embed=1)
    text = str(info.value)
    assert "multiple of 32" in text and "num_res_blocks" in text and "n_embed" in text


def test_config_is_frozen_and_round_trips_through_a_dict():
    config = AutoEncoderConfig(kind="vq", n_embed=64, ch=64, ch_mult=(1, 2), attn_resolutions=(16,), scale_factor=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.ch = 32
    again = AutoEncoderConfig.from_dict(config.to_dict())
    assert again == config and again.ch_mult == (1, 2) and again.attn_resolutions == (16,)
    assert config.replace(ch=32).ch == 32 and config.ch == 64


def test_from_dict_rejects_unknown_fields_and_non_mappings():
    with pytest.raises(ConfigError, match="unknown config fields: bogus, zeta"):
        AutoEncoderConfig.from_dict({"ch": 32, "zeta": 1, "bogus": 2})
    with pytest.raises(ConfigError, match="mapping"):
        AutoEncoderConfig.from_dict([["ch", 32]])
    with pytest.raises(ConfigError, match="ch_mult must be a list of integers"):
        AutoEncoderConfig.from_dict({"ch_mult": ["x"]})


# --- diagonal Gaussian ----------------------------------------------------------------------------------


def moments(seed=0, shape=(2, 8, 3, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 2


def test_gaussian_mode_is_the_mean_half():
    m = moments()
    dist = DiagonalGaussian(m)
    assert torch.equal(dist.mode(), m[:, :4])
    assert torch.equal(dist.logvar, m[:, 4:])


def test_gaussian_sample_is_reproducible_and_follows_the_formula():
    m = moments(1)
    dist = DiagonalGaussian(m)
    a = dist.sample(torch.Generator().manual_seed(7))
    b = dist.sample(torch.Generator().manual_seed(7))
    c = dist.sample(torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    noise = torch.randn(m[:, :4].shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, m[:, :4] + torch.exp(0.5 * m[:, 4:]) * noise)


def test_gaussian_logvar_is_clamped_to_minus_30_20():
    m = torch.zeros(1, 2, 1, 5)
    m[0, 1, 0] = torch.tensor([-100.0, -30.0, 0.0, 20.0, 100.0])
    dist = DiagonalGaussian(m)
    assert dist.logvar.flatten().tolist() == [-30.0, -30.0, 0.0, 20.0, 20.0]
    torch.testing.assert_close(dist.std.flatten(), torch.exp(torch.tensor([-15.0, -15.0, 0.0, 10.0, 10.0])))
    assert torch.isfinite(dist.kl()).all()  # exp(100) would overflow fp32
    assert torch.isfinite(dist.sample(torch.Generator().manual_seed(0))).all()


def test_gaussian_kl_matches_torch_distributions():
    m = moments(2)
    dist = DiagonalGaussian(m)
    mean, logvar = m[:, :4], m[:, 4:]
    reference = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    assert dist.kl().shape == (2,)
    torch.testing.assert_close(dist.kl(), reference, rtol=1e-5, atol=1e-4)


# --- vector quantiser -----------------------------------------------------------------------------------


def quantizer(n_embed=12, dim=3, seed=0, beta=0.25):
    torch.manual_seed(seed)
    vq = VectorQuantizer(n_embed, dim, beta=beta)
    with torch.no_grad():
        vq.embedding.weight.normal_(generator=torch.Generator().manual_seed(seed))
    return vq.eval()


def brute_force_indices(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """argmin_k ||z_p - e_k||^2 for every position p, in float64, one explicit difference per pair."""
    flat = z.permute(0, 2, 3, 1).reshape(-1, 1, z.shape[1]).double()
    distances = ((flat - codebook.double()[None]) ** 2).sum(-1)
    return distances.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])


def test_vq_indices_are_the_nearest_codes():
    vq = quantizer()
    z = torch.randn(2, 3, 7, 9, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        q = vq(z)
    want = brute_force_indices(z, vq.embedding.weight)
    assert q.indices.dtype == torch.int64 and q.indices.shape == (2, 7, 9)
    assert torch.equal(q.indices, want)
    assert len(torch.unique(want)) > 5  # a real test: many codes in play
    assert torch.equal(q.codes, vq.embedding.weight[want].permute(0, 3, 1, 2))
    # chunked search (chunk smaller than the number of vectors) gives the same answer
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    assert torch.equal(vq.nearest(flat, chunk=10), want.flatten())


def test_vq_indices_to_codes_inverts_the_indices():
    vq = quantizer()
    z = torch.randn(1, 3, 4, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        q = vq(z)
        codes = vq.indices_to_codes(q.indices)
        assert torch.equal(codes, q.codes)
        assert torch.equal(vq.indices_to_codes(q.indices.to(torch.int32)), q.codes)
        assert torch.equal(vq(codes).indices, q.indices)  # a code is its own nearest code


@pytest.mark.parametrize(
    "indices, error, message",
    [
        (torch.tensor([[[0, 12]]]), ValueError, r"must lie in \[0, 12\), got \[0, 12\]"),
        (torch.tensor([[[-1, 3]]]), ValueError, r"must lie in \[0, 12\), got \[-1, 3\]"),
        (torch.tensor([[[0.0, 1.0]]]), TypeError, "must be integers, got torch.float32"),
    ],
)
def test_vq_bad_indices_get_a_clear_error(indices, error, message):
    with pytest.raises(error, match=message):
        quantizer().indices_to_codes(indices)


def test_vq_loss_value_and_gradients_follow_the_formula():
    beta = 0.3
    vq = quantizer(beta=beta).train()
    z = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(5), requires_grad=True)
    q = vq(z)
    e = vq.embedding.weight.detach()[q.indices].permute(0, 3, 1, 2)
    n = z.numel()
    torch.testing.assert_close(q.loss, (1 + beta) * ((e - z.detach()) ** 2).sum() / n)
    torch.testing.assert_close(q.codes, e)  # straight-through keeps the forward value

    q.loss.backward()
    # the codebook term pulls the chosen codes towards z, the commitment term pulls z towards them
    torch.testing.assert_close(z.grad, beta * 2 * (z.detach() - e) / n)
    expected = torch.zeros_like(vq.embedding.weight)
    expected.index_add_(0, q.indices.flatten(), (2 * (e - z.detach()) / n).permute(0, 2, 3, 1).reshape(-1, 3))
    torch.testing.assert_close(vq.embedding.weight.grad, expected)


def test_vq_codes_pass_gradients_straight_through():
    vq = quantizer().train()
    z = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(6), requires_grad=True)
    weights = torch.randn(1, 3, 4, 4)
    (vq(z).codes * weights).sum().backward()
    assert torch.equal(z.grad, weights)
    assert vq.embedding.weight.grad is None or not vq.embedding.weight.grad.any()


def test_vq_codes_are_codebook_rows_without_autograd_even_in_training_mode():
    vq = quantizer().train()
    z = torch.randn(1, 3, 5, 5, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        q = vq(z)
    assert torch.equal(q.codes, vq.embedding.weight[q.indices].permute(0, 3, 1, 2))
    torch.testing.assert_close(q.loss, 1.25 * ((q.codes - z) ** 2).mean())  # validation loss still there


def test_vq_in_inference_has_no_loss_graph():
    vq = quantizer().eval()
    with torch.inference_mode():
        q = vq(torch.randn(1, 3, 2, 2))
    assert q.loss.item() == 0.0 and not q.codes.requires_grad


# --- the autoencoder ---------------------------------------------------------------------------------


def test_kl_encode_is_the_mean_of_the_quant_conv_moments():
    model = kl_model()
    x = image(2, 3, 16, 24)
    with torch.no_grad():
        h = model.quant_conv(model.encoder(x))
        z = model.encode(x)
        drawn = model.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
        drawn_again = model.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
    assert z.shape == (2, 4, 8, 12)
    assert torch.equal(z, h[:, :4])
    assert torch.equal(drawn, drawn_again) and not torch.equal(drawn, z)
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(drawn, h[:, :4] + torch.exp(0.5 * h[:, 4:].clamp(-30, 20)) * noise)


def test_decode_applies_post_quant_conv_then_the_decoder():
    model = kl_model(embed_dim=3)
    z = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.decode(z), model.decoder(model.post_quant_conv(z)))
        assert model.decode(z).shape == (1, 3, 16, 16)


def test_scale_and_unscale_are_inverse_and_applied_by_encode_and_decode():
    scale, shift = 0.18215, 0.1159
    model = kl_model(scale_factor=scale, shift_factor=shift)
    x = image(1, 3, 16, 16, seed=1)
    with torch.no_grad():
        mean = model.quant_conv(model.encoder(x))[:, :4]
        scaled = model.encode(x, scaled=True)
        torch.testing.assert_close(scaled, (mean - shift) * scale, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(model.unscale(scaled), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.scale(model.unscale(scaled)), scaled, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.decode(scaled, scaled=True), model.decode(mean), rtol=1e-4, atol=1e-5)
        # the factors really are used: without scaled=True the latent differs
        assert (model.decode(scaled) - model.decode(mean)).abs().max() > 1e-3


def test_vq_encode_decode_and_indices_agree():
    model = vq_model(scale_factor=2.0, shift_factor=0.5)
    x = image(1, 3, 16, 24, seed=2)
    with torch.no_grad():
        h = model.quant_conv(model.encoder(x))
        indices = model.encode_indices(x)
        codes = model.encode(x)
        assert indices.shape == (1, 8, 12)
        assert torch.equal(indices, brute_force_indices(h, model.quantize.embedding.weight))
        assert torch.equal(codes, model.quantize.embedding.weight[indices].permute(0, 3, 1, 2))
        assert torch.equal(model.encode(x, scaled=True), (codes - 0.5) * 2.0)
        assert torch.equal(model.decode_indices(indices), model.decode(codes))


def test_indices_are_refused_for_kl_models():
    model = kl_model()
    with pytest.raises(ConfigError, match="only for VQ"):
        model.encode_indices(image(1, 3, 16, 16))
    with pytest.raises(ConfigError, match="only for VQ"):
        model.decode_indices(torch.zeros(1, 8, 8, dtype=torch.long))


def test_training_forward_returns_reconstruction_loss_and_indices():
    kl = kl_model()
    x = image(2, 3, 16, 16, seed=3)
    recon, loss, indices = kl(x, generator=torch.Generator().manual_seed(0))
    assert recon.shape == x.shape and indices is None
    h = kl.quant_conv(kl.encoder(x)).detach()
    mean, logvar = h[:, :4], h[:, 4:].clamp(-30, 20)
    expected = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)  # mean KL per latent value

    vq = vq_model()
    recon, loss, indices = vq(x)
    assert recon.shape == x.shape and indices.shape == (2, 8, 8) and loss.item() > 0


def assert_every_parameter_learns(model: AutoEncoder, skip=()):
    for name, p in model.named_parameters():
        if name in skip:
            continue
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_gradients_reach_every_parameter_of_a_kl_model():
    model = kl_model().train()
    x = image(2, 3, 16, 16, seed=4)
    recon, reg, _ = model(x, generator=torch.Generator().manual_seed(0))
    (F.l1_loss(recon, x) + 1e-6 * reg).backward()
    assert_every_parameter_learns(model)


def test_gradients_reach_every_parameter_of_a_vq_model():
    model = vq_model().train()
    x = image(2, 3, 16, 16, seed=5)

    # reconstruction alone: the encoder learns through the straight-through codes, the codebook not
    recon, reg, indices = model(x)
    F.l1_loss(recon, x).backward(retain_graph=True)
    codebook = model.quantize.embedding.weight
    assert codebook.grad is None or not codebook.grad.any()
    assert_every_parameter_learns(model, skip={"quantize.embedding.weight"})

    # with the codebook loss the codes in use (and only those) learn too
    model.zero_grad()
    (F.l1_loss(recon, x) + reg).backward()
    assert_every_parameter_learns(model, skip={"quantize.embedding.weight"})
    used = torch.zeros(codebook.shape[0], dtype=torch.bool)
    used[indices.unique()] = True
    assert used.sum() >= 2
    rows = codebook.grad.abs().sum(1)
    assert torch.isfinite(codebook.grad).all()
    assert (rows[used] > 0).all() and (rows[~used] == 0).all()


def test_an_optimiser_step_lowers_the_loss():
    model = kl_model().train()
    x = image(1, 3, 16, 16, seed=6)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        recon, _, _ = model(x, sample=False)
        loss = F.l1_loss(recon, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# --- strict loading ----------------------------------------------------------------------------------


def test_load_strict_accepts_an_original_layout_state_dict():
    target = kl_model()
    torch.manual_seed(9)
    original = {k: torch.randn(v.shape) for k, v in target.state_dict().items()}
    load_strict(target, dict(original), "original.ckpt")
    loaded = target.state_dict()
    assert all(torch.equal(loaded[k], original[k]) for k in original)


def test_load_strict_lists_missing_unexpected_and_misshapen_keys_and_loads_nothing():
    target = kl_model()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    state = {k: torch.zeros(v.shape) for k, v in target.state_dict().items()}
    del state["encoder.conv_in.bias"]
    state["encoder.down.0.block.0.conv_shortcut.weight"] = torch.zeros(1)
    state["decoder.conv_out.weight"] = torch.zeros(3, 32, 1, 1)
    with pytest.raises(FileError) as info:
        load_strict(target, state, "/some/foreign.safetensors")
    text = str(info.value)
    assert text.startswith("/some/foreign.safetensors: weights do not match the model")
    assert "1 missing: encoder.conv_in.bias" in text
    assert "1 unexpected: encoder.down.0.block.0.conv_shortcut.weight" in text
    assert "1 wrong shape: decoder.conv_out.weight (3, 32, 1, 1) != (3, 32, 3, 3)" in text
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_load_strict_shortens_long_lists():
    target = kl_model()
    with pytest.raises(FileError) as info:
        load_strict(target, {}, "empty.safetensors")
    count = len(target.state_dict())
    assert f"{count} missing: " in str(info.value) and f"(+{count - 8} more)" in str(info.value)
