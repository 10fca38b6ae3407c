"""Checkpoint readers (issue 5): every format, compared with diffusers; safety; conversion.

For each format the test writes random weights of a small complete config (built with diffusers,
or in the original layout taken from a vqcli twin whose parity with diffusers tests/test_parity.py
establishes), reads them back with ``load_checkpoint`` and compares with diffusers' own outputs.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import (
    TINY_KL,
    TINY_VQ,
    build_diffusers,
    random_images,
    seed_codebook_,
    vqcli_twin,
)
from safetensors.torch import save_file

from vqcli.checkpoints.configs import check_diffusers_config
from vqcli.checkpoints.convert import convert_checkpoint
from vqcli.checkpoints.infer import infer_config
from vqcli.checkpoints.native import save_native
from vqcli.checkpoints.read import (
    Checkpoint,
    apply_conventions,
    load_checkpoint,
    read_checkpoint,
)
from vqcli.errors import FileError, UsageError
from vqcli.model.autoencoder import AutoEncoder
from vqcli.model.config import AutoEncoderConfig

TOL = 1e-4


# --- references --------------------------------------------------------------------------------


@dataclass
class Reference:
    """A diffusers model and its outputs on fixed inputs: what every loaded checkpoint must reproduce."""

    config: AutoEncoderConfig
    dmodel: torch.nn.Module
    x: torch.Tensor
    moments: torch.Tensor  # quant_conv output
    z: torch.Tensor  # a latent to decode (for VQ: the quantised codes)
    decoded: torch.Tensor
    indices: torch.Tensor | None = None
    _original: dict[str, torch.Tensor] | None = None

    def original_state(self) -> dict[str, torch.Tensor]:
        """The weights in the original ldm / taming layout (= vqcli's parameter names).

        A new dict each time (tests add and remove keys), sharing tensors nobody modifies in place.
        """
        if self._original is None:
            self._original = {k: v.detach() for k, v in vqcli_twin(self.dmodel, self.config).state_dict().items()}
        return dict(self._original)

    def check(self, model: AutoEncoder) -> None:
        with torch.no_grad():
            diff = (model.encode_moments(self.x) - self.moments).abs().max().item()
            assert diff <= TOL, f"encoder moments differ by {diff:.3g}"
            diff = (model.decode(self.z) - self.decoded).abs().max().item()
            assert diff <= TOL, f"decoder outputs differ by {diff:.3g}"
            if self.indices is not None:
                assert torch.equal(model.encode_indices(self.x), self.indices)


@pytest.fixture(scope="module")
def kl() -> Reference:
    dmodel = build_diffusers(TINY_KL, seed=21)
    x = random_images(2, 16, 24, seed=22)
    with torch.no_grad():
        moments = dmodel.encode(x).latent_dist.parameters
        z = moments[:, : TINY_KL.z_channels]
        return Reference(TINY_KL, dmodel, x, moments, z, dmodel.decode(z).sample)


@pytest.fixture(scope="module")
def vq() -> Reference:
    dmodel = build_diffusers(TINY_VQ, seed=23)
    x = random_images(2, 16, 20, seed=24)
    seed_codebook_(dmodel, x)
    with torch.no_grad():
        h = dmodel.encode(x).latents
        codes, _, (_, _, flat) = dmodel.quantize(h)
        indices = flat.reshape(h.shape[0], h.shape[2], h.shape[3])
        return Reference(TINY_VQ, dmodel, x, h, codes, dmodel.decode(h).sample, indices)


# --- writers: one per format -------------------------------------------------------------------


def fake_unet_and_text_encoder() -> dict[str, torch.Tensor]:
    return {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3),
        "model.diffusion_model.out.2.bias": torch.randn(4),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.randn(10, 8),
        "model_ema.decay": torch.tensor(0.9999),
        "alphas_cumprod": torch.rand(10),
    }


def training_leftovers() -> dict[str, torch.Tensor]:
    """What ldm / taming training saves beside the autoencoder: LPIPS and the discriminator."""
    return {
        "loss.logvar": torch.zeros(()),
        "loss.perceptual_loss.net.slice1.0.weight": torch.randn(8, 3, 3, 3),
        "loss.perceptual_loss.lin0.model.1.weight": torch.randn(1, 8, 1, 1),
        "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4),
        "loss.discriminator.main.2.weight": torch.randn(16, 8, 4, 4),
    }


def lightning_ckpt(state: dict[str, torch.Tensor]) -> dict:
    return {
        "epoch": 7,
        "global_step": 12345,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": state,
        "optimizer_states": [
            {"state": {0: {"step": 10, "exp_avg": torch.randn(4)}}, "param_groups": [{"lr": 4.5e-6, "params": [0]}]}
        ],
        "lr_schedulers": [],
    }


def write_native(tmp: Path, ref: Reference) -> Path:
    path = tmp / "model.safetensors"
    save_native(vqcli_twin(ref.dmodel, ref.config), path)
    return path


def write_original_safetensors(tmp: Path, ref: Reference) -> Path:
    save_file(ref.original_state(), str(tmp / "vae.safetensors"))
    return tmp / "vae.safetensors"


def write_safetensors_named_ckpt(tmp: Path, ref: Reference) -> Path:
    """Readers go by content, not by name: a safetensors file called .ckpt."""
    save_file(ref.original_state(), str(tmp / "vae.ckpt"))
    return tmp / "vae.ckpt"


def write_original_pt(tmp: Path, ref: Reference) -> Path:
    torch.save(ref.original_state(), tmp / "vae.pt")
    return tmp / "vae.pt"


def write_original_pth_legacy(tmp: Path, ref: Reference) -> Path:
    torch.save(ref.original_state(), tmp / "vae.pth", _use_new_zipfile_serialization=False)
    return tmp / "vae.pth"


def write_lightning_ckpt(tmp: Path, ref: Reference) -> Path:
    torch.save(lightning_ckpt({**ref.original_state(), **training_leftovers()}), tmp / "last.ckpt")
    return tmp / "last.ckpt"


def write_full_sd_safetensors(tmp: Path, ref: Reference) -> Path:
    state = {f"first_stage_model.{k}": v for k, v in ref.original_state().items()}
    save_file({**fake_unet_and_text_encoder(), **state}, str(tmp / "sd-full.safetensors"))
    return tmp / "sd-full.safetensors"


def write_full_sd_ckpt(tmp: Path, ref: Reference) -> Path:
    state = {f"first_stage_model.{k}": v for k, v in ref.original_state().items()}
    torch.save(lightning_ckpt({**fake_unet_and_text_encoder(), **state}), tmp / "sd-full.ckpt")
    return tmp / "sd-full.ckpt"


def write_vae_prefixed(tmp: Path, ref: Reference) -> Path:
    state = {f"vae.{k}": v for k, v in ref.original_state().items()}
    save_file({**state, "transformer.blocks.0.weight": torch.randn(4, 4)}, str(tmp / "bundle.safetensors"))
    return tmp / "bundle.safetensors"


def write_diffusers_folder(tmp: Path, ref: Reference) -> Path:
    ref.dmodel.save_pretrained(tmp / "folder")
    return tmp / "folder"


def write_diffusers_folder_bin(tmp: Path, ref: Reference) -> Path:
    ref.dmodel.save_pretrained(tmp / "folder", safe_serialization=False)
    assert (tmp / "folder" / "diffusion_pytorch_model.bin").is_file()
    return tmp / "folder"


def write_pipeline_folder(tmp: Path, ref: Reference) -> Path:
    sub = "vae" if ref.config.kind == "kl" else "vqvae"
    ref.dmodel.save_pretrained(tmp / "pipeline" / sub)
    (tmp / "pipeline" / "model_index.json").write_text("{}")
    return tmp / "pipeline"


def write_diffusers_weights_file_in_folder(tmp: Path, ref: Reference) -> Path:
    ref.dmodel.save_pretrained(tmp / "folder")
    return tmp / "folder" / "diffusion_pytorch_model.safetensors"


def write_single_diffusers_file(tmp: Path, ref: Reference) -> Path:
    save_file({k: v.contiguous() for k, v in ref.dmodel.state_dict().items()}, str(tmp / "diffusers-vae.safetensors"))
    return tmp / "diffusers-vae.safetensors"


LEGACY_NAMES = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}


def write_legacy_diffusers_file(tmp: Path, ref: Reference) -> Path:
    """A diffusers-layout file from before diffusers 0.15 (query/key/value/proj_attn), as a .bin."""
    state = {}
    for key, value in ref.dmodel.state_dict().items():
        for new, old in LEGACY_NAMES.items():
            key = key.replace(f".{new}", f".{old}")
        state[key] = value
    assert any(".proj_attn." in k for k in state)
    torch.save(state, tmp / "old-diffusers.bin")
    return tmp / "old-diffusers.bin"


def write_taming_ckpt(tmp: Path, ref: Reference) -> Path:
    torch.save(lightning_ckpt({**ref.original_state(), **training_leftovers()}), tmp / "last.ckpt")
    return tmp / "last.ckpt"


def taming_yaml(config: AutoEncoderConfig, **overrides) -> str:
    dd = dict(
        double_z=False,
        z_channels=config.z_channels,
        resolution=config.resolution,
        in_channels=3,
        out_ch=3,
        ch=config.ch,
        ch_mult=list(config.ch_mult),
        num_res_blocks=config.num_res_blocks,
        attn_resolutions=list(config.attn_resolutions),
        dropout=0.0,
    )
    dd.update(overrides)
    lines = [
        "model:",
        "  base_learning_rate: 4.5e-06",
        "  target: taming.models.vqgan.VQModel",
        "  params:",
        f"    embed_dim: {config.embed_dim}",
        f"    n_embed: {config.n_embed}",
        "    ddconfig:",
        *[f"      {k}: {json.dumps(v)}" for k, v in dd.items()],
        "    lossconfig:",
        "      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
        "      params: {disc_start: 250001, disc_weight: 0.8}",
    ]
    return "\n".join(lines) + "\n"


def write_taming_logs_with_yaml(tmp: Path, ref: Reference) -> Path:
    """taming's log layout: logs/<run>/checkpoints/last.ckpt and logs/<run>/configs/<date>-project.yaml."""
    run = tmp / "logs" / "vqgan_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "configs").mkdir()
    (run / "configs" / "2020-11-09T13-31-51-project.yaml").write_text(taming_yaml(ref.config))
    return write_taming_ckpt(run / "checkpoints", ref)


KL_WRITERS = [
    write_native,
    write_original_safetensors,
    write_safetensors_named_ckpt,
    write_original_pt,
    write_original_pth_legacy,
    write_lightning_ckpt,
    write_full_sd_safetensors,
    write_full_sd_ckpt,
    write_vae_prefixed,
    write_diffusers_folder,
    write_diffusers_folder_bin,
    write_pipeline_folder,
    write_diffusers_weights_file_in_folder,
    write_single_diffusers_file,
    write_legacy_diffusers_file,
]
VQ_WRITERS = [
    write_native,
    write_taming_ckpt,
    write_taming_logs_with_yaml,
    write_original_safetensors,
    write_diffusers_folder,
    write_pipeline_folder,
    write_single_diffusers_file,
]


@pytest.mark.parametrize("writer", KL_WRITERS, ids=lambda w: w.__name__[len("write_") :])
def test_every_kl_format_reproduces_diffusers(writer, kl, tmp_path):
    model = load_checkpoint(writer(tmp_path, kl))
    assert model.config.kind == "kl"
    kl.check(model)


@pytest.mark.parametrize("writer", VQ_WRITERS, ids=lambda w: w.__name__[len("write_") :])
def test_every_vq_format_reproduces_diffusers_with_identical_indices(writer, vq, tmp_path):
    model = load_checkpoint(writer(tmp_path, vq))
    assert model.config.kind == "vq" and model.config.n_embed == TINY_VQ.n_embed
    vq.check(model)


# --- what the readers understand ---------------------------------------------------------------


def test_architecture_is_inferred_from_shapes_alone(kl, vq):
    for ref in (kl, vq):
        inferred = infer_config(ref.original_state(), source="x")
        c = ref.config
        assert (inferred.kind, inferred.ch, inferred.ch_mult, inferred.num_res_blocks) == (
            c.kind,
            c.ch,
            c.ch_mult,
            c.num_res_blocks,
        )
        assert (inferred.z_channels, inferred.embed_dim, inferred.double_z, inferred.n_embed) == (
            c.z_channels,
            c.embed_dim,
            c.double_z,
            c.n_embed,
        )
        # attention at the same levels (the nominal resolution may differ)
        levels = lambda cfg: [i for i in range(len(cfg.ch_mult)) if cfg.resolution // 2**i in cfg.attn_resolutions]  # noqa: E731
        assert levels(inferred) == levels(c)
        assert inferred.use_quant_conv and inferred.use_post_quant_conv and inferred.resamp_with_conv


def test_inference_covers_no_quant_convs_and_no_resample_conv():
    config = TINY_KL.replace(use_quant_conv=False, use_post_quant_conv=False, resamp_with_conv=False, num_res_blocks=2)
    inferred = infer_config(AutoEncoder(config).state_dict(), source="x")
    assert not inferred.use_quant_conv and not inferred.use_post_quant_conv
    assert not inferred.resamp_with_conv and inferred.num_res_blocks == 2


def test_full_checkpoint_ignores_everything_but_the_autoencoder(kl, tmp_path):
    for writer in (write_full_sd_safetensors, write_full_sd_ckpt):
        ckpt = read_checkpoint(writer(tmp_path, kl))
        assert ckpt.format == "original"
        assert ckpt.ignored == len(fake_unet_and_text_encoder())
        assert set(ckpt.state) == set(kl.original_state())


def test_taming_ckpt_ignores_loss_weights_and_optimizer_state(vq, tmp_path):
    ckpt = read_checkpoint(write_taming_ckpt(tmp_path, vq))
    assert ckpt.ignored == len(training_leftovers())
    assert not any(k.startswith("loss.") for k in ckpt.state)


@pytest.fixture(scope="module")
def kl_no_mid() -> Reference:
    """A KL model without the middle attention block (diffusers' mid_block_add_attention=False)."""
    config = TINY_KL.replace(mid_attention=False)
    dmodel = build_diffusers(config, seed=25)
    assert not any(k.startswith(("encoder.mid_block.attentions", "decoder.mid_block.attentions")) for k in dmodel.state_dict())
    x = random_images(2, 16, 24, seed=26)
    with torch.no_grad():
        moments = dmodel.encode(x).latent_dist.parameters
        z = moments[:, : config.z_channels]
        return Reference(config, dmodel, x, moments, z, dmodel.decode(z).sample)


@pytest.mark.parametrize("writer", [write_original_safetensors, write_diffusers_folder, write_native], ids=lambda w: w.__name__)
def test_model_without_middle_attention_loads_from_every_layout_and_matches_diffusers(writer, kl_no_mid, tmp_path):
    assert "encoder.mid.attn_1.q.weight" not in kl_no_mid.original_state()
    model = load_checkpoint(writer(tmp_path, kl_no_mid))
    assert model.config.mid_attention is False and not hasattr(model.encoder.mid, "attn_1")
    kl_no_mid.check(model)


def test_model_without_middle_attention_converts_to_a_folder_diffusers_loads(kl_no_mid, tmp_path):
    import diffusers

    convert_checkpoint(write_original_safetensors(tmp_path, kl_no_mid), tmp_path / "out", to="diffusers")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["mid_block_add_attention"] is False
    reloaded = diffusers.AutoencoderKL.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert (reloaded.decode(kl_no_mid.z).sample - kl_no_mid.decoded).abs().max().item() <= TOL


def test_middle_attention_in_one_coder_only_or_against_the_config_is_refused(kl, kl_no_mid, tmp_path):
    state = {k: v for k, v in kl.original_state().items() if not k.startswith("decoder.mid.attn_1.")}
    with pytest.raises(FileError, match="only the encoder has a middle attention block"):
        infer_config(state, source="x")
    folder = write_diffusers_folder(tmp_path, kl_no_mid)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "mid_block_add_attention": True}))
    with pytest.raises(FileError, match="mid_attention True vs False"):
        load_checkpoint(folder)


def test_ldm_yaml_attn_type_none_means_no_attention_anywhere(tmp_path):
    config = TINY_KL.replace(mid_attention=False, attn_resolutions=())
    weights = tmp_path / "noattn.safetensors"
    save_file(AutoEncoder(config).state_dict(), str(weights))
    yaml = taming_yaml(TINY_KL, attn_type="none", double_z=True).replace("n_embed", "n_unused")
    (tmp_path / "noattn.yaml").write_text(yaml)
    loaded = load_checkpoint(weights)
    assert loaded.config.mid_attention is False and loaded.config.attn_resolutions == ()
    (tmp_path / "noattn.yaml").write_text(yaml.replace('"none"', '"linear"'))
    with pytest.raises(FileError, match="attn_type 'linear' is not supported"):
        load_checkpoint(weights)
    (tmp_path / "noattn.yaml").write_text(yaml.replace('"none"', '"vanilla"'))
    with pytest.raises(FileError, match="mid_attention True vs False"):
        load_checkpoint(weights)


def test_taming_yaml_is_found_and_supplies_resolution(vq, tmp_path):
    path = write_taming_logs_with_yaml(tmp_path, vq)
    ckpt = read_checkpoint(path)
    assert ckpt.config.resolution == TINY_VQ.resolution
    assert ckpt.config.attn_resolutions == TINY_VQ.attn_resolutions
    assert load_checkpoint(path).config.scale_factor == 1.0


def test_yaml_that_disagrees_with_the_weights_is_an_error_naming_the_fields(vq, tmp_path):
    path = write_taming_ckpt(tmp_path, vq)
    (tmp_path / "model.yaml").write_text(taming_yaml(TINY_VQ, ch=64, num_res_blocks=2))
    with pytest.raises(FileError) as e:
        load_checkpoint(path)
    message = str(e.value)
    assert "model.yaml" in message and "ch 64 vs 32" in message and "num_res_blocks 2 vs 1" in message


def test_full_ldm_yaml_states_the_scale_factor(kl, tmp_path):
    path = write_full_sd_ckpt(tmp_path, kl)
    c = TINY_KL
    (tmp_path / "sd-full.yaml").write_text(
        "model:\n"
        "  target: ldm.models.diffusion.ddpm.LatentDiffusion\n"
        "  params:\n"
        "    scale_factor: 0.18215\n"
        "    first_stage_config:\n"
        "      target: ldm.models.autoencoder.AutoencoderKL\n"
        "      params:\n"
        f"        embed_dim: {c.embed_dim}\n"
        "        ddconfig:\n"
        f"          double_z: true\n          z_channels: {c.z_channels}\n          resolution: 64\n"
        f"          in_channels: 3\n          out_ch: 3\n          ch: {c.ch}\n"
        f"          ch_mult: {list(c.ch_mult)}\n          num_res_blocks: {c.num_res_blocks}\n"
        "          attn_resolutions: [32]\n"
        "        lossconfig: {target: torch.nn.Identity}\n"
    )
    model = load_checkpoint(path)
    assert model.config.scale_factor == pytest.approx(0.18215)
    assert (model.config.resolution, model.config.attn_resolutions) == (64, (32,))
    kl.check(model)


def test_config_json_that_disagrees_with_the_weights_is_an_error(kl, tmp_path):
    folder = write_diffusers_folder(tmp_path, kl)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["layers_per_block"] = 2
    cfg["down_block_types"] = ["DownEncoderBlock2D"] * 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileError) as e:
        load_checkpoint(folder)
    assert "num_res_blocks 2 vs 1" in str(e.value) and "down_block_types" in str(e.value)


def test_diffusers_scaling_and_shift_factor_are_taken_from_config_json(kl, tmp_path):
    folder = write_diffusers_folder(tmp_path, kl)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(scaling_factor=0.5, shift_factor=0.25)
    (folder / "config.json").write_text(json.dumps(cfg))
    model = load_checkpoint(folder)
    assert (model.config.scale_factor, model.config.shift_factor) == (0.5, 0.25)
    model = load_checkpoint(folder, scale_factor=2.0)
    assert (model.config.scale_factor, model.config.shift_factor) == (2.0, 0.25)


def test_half_precision_stays_half_unless_asked(kl, tmp_path):
    state = {k: v.half() for k, v in kl.original_state().items()}
    save_file(state, str(tmp_path / "half.safetensors"))
    model = load_checkpoint(tmp_path / "half.safetensors")
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    model = load_checkpoint(tmp_path / "half.safetensors", dtype="float32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with pytest.raises(UsageError):
        load_checkpoint(tmp_path / "half.safetensors", dtype="float8")


def test_vqcli_training_checkpoint_gives_its_ema_weights(kl, tmp_path):
    state = kl.original_state()
    noise = {k: torch.randn_like(v) for k, v in state.items()}
    torch.save(
        {
            "format": "vqcli.train-checkpoint",
            "config": json.dumps(TINY_KL.to_dict()),
            "model": noise,
            "ema": state,
            "optimizer": {"state": {}, "param_groups": []},
            "step": 3,
        },
        tmp_path / "run.safetensors.ckpt",
    )
    kl.check(load_checkpoint(tmp_path / "run.safetensors.ckpt"))


# --- presets and latent conventions ------------------------------------------------------------


def meta_checkpoint(config: AutoEncoderConfig, stated: bool = False) -> Checkpoint:
    """A checkpoint of a full-size architecture without its data (shapes are all presets look at)."""
    with torch.device("meta"):
        state = AutoEncoder(config).state_dict()
    return Checkpoint(Path("big.safetensors"), "original", infer_config(state, source="big"), state, factors_stated=stated)


SD = AutoEncoderConfig(kind="kl", ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4)
Z16 = AutoEncoderConfig(
    kind="kl", ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16, use_quant_conv=False, use_post_quant_conv=False
)


def test_sd_architecture_is_recognised_and_ambiguity_is_reported(caplog):
    with caplog.at_level(logging.WARNING):
        config = apply_conventions(meta_checkpoint(SD))
    assert (config.name, config.scale_factor, config.shift_factor) == ("sd1", 0.18215, 0.0)
    assert "sdxl" in caplog.text and "--preset" in caplog.text
    assert apply_conventions(meta_checkpoint(SD), preset="sdxl").scale_factor == 0.13025


def test_sd3_and_flux_factors(caplog):
    with caplog.at_level(logging.WARNING):
        guessed = apply_conventions(meta_checkpoint(Z16))
    assert (guessed.scale_factor, guessed.shift_factor) == (1.5305, 0.0609)
    assert "flux" in caplog.text
    flux = apply_conventions(meta_checkpoint(Z16), preset="flux")
    assert (flux.name, flux.scale_factor, flux.shift_factor) == ("flux", 0.3611, 0.1159)
    overridden = apply_conventions(meta_checkpoint(Z16), preset="flux", shift_factor=0.0)
    assert (overridden.scale_factor, overridden.shift_factor) == (0.3611, 0.0)


def test_preset_that_does_not_fit_the_weights_is_an_error(kl, tmp_path):
    with pytest.raises(FileError, match="preset sdxl"):
        apply_conventions(meta_checkpoint(Z16), preset="sdxl")
    with pytest.raises(UsageError, match="choose from"):
        apply_conventions(meta_checkpoint(Z16), preset="sd5")
    # architecture-free presets fit anything and set factors only
    assert load_checkpoint(write_original_safetensors(tmp_path, kl), preset="ldm").config.scale_factor == 1.0


def test_unknown_architecture_without_stated_factors_uses_one(kl, tmp_path):
    model = load_checkpoint(write_original_safetensors(tmp_path, kl))
    assert (model.config.scale_factor, model.config.shift_factor) == (1.0, 0.0)


def test_config_json_factors_name_the_preset():
    inferred = meta_checkpoint(SD).config
    cfg = {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
           "latent_channels": 4, "scaling_factor": 0.13025}
    config, stated = check_diffusers_config(cfg, inferred, "config.json")
    assert stated and (config.name, config.scale_factor) == ("sdxl", 0.13025)
    cfg = {"_class_name": "AutoencoderKL", "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159,
           "use_quant_conv": False, "use_post_quant_conv": False}
    config, _ = check_diffusers_config(cfg, meta_checkpoint(Z16).config, "config.json")
    assert (config.name, config.shift_factor) == ("flux", 0.1159)


def test_embedded_model_by_name(kl, tmp_path, monkeypatch):
    monkeypatch.setenv("VQCLI_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileError, match="not installed"):
        load_checkpoint("default")
    (tmp_path / "weights").mkdir()
    write_native(tmp_path, kl).rename(tmp_path / "weights" / "default.safetensors")
    kl.check(load_checkpoint("default"))


# --- errors and safety -------------------------------------------------------------------------


def one_line_error(path, **kwargs) -> str:
    with pytest.raises(FileError) as e:
        load_checkpoint(path, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_file_of_another_family_is_refused_naming_what_did_not_match(tmp_path):
    import diffusers

    tiny = diffusers.AutoencoderTiny(
        encoder_block_out_channels=(32, 32), decoder_block_out_channels=(32, 32), num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
    )
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(tmp_path / "taesd.safetensors"))
    message = one_line_error(tmp_path / "taesd.safetensors")
    assert "taesd.safetensors" in message and "not an autoencoder" in message and "encoder.layers (17 keys)" in message

    tiny.save_pretrained(tmp_path / "taesd")
    message = one_line_error(tmp_path / "taesd")
    assert "AutoencoderTiny" in message and "config.json" in message


def test_unexpected_and_missing_keys_are_listed(kl, tmp_path):
    state = kl.original_state()
    state["encoder.mid.attn_2.q.weight"] = torch.randn(64, 64, 1, 1)
    del state["decoder.up.0.block.1.norm2.bias"]
    save_file(state, str(tmp_path / "odd.safetensors"))
    message = one_line_error(tmp_path / "odd.safetensors")
    assert "1 missing: decoder.up.0.block.1.norm2.bias" in message
    assert "1 unexpected: encoder.mid.attn_2.q.weight" in message


def test_unrecognised_quantizer_and_video_weights_are_explained(kl, tmp_path):
    state = kl.original_state()
    state["quantize.embed.weight"] = torch.randn(16, 4)  # Gumbel quantizer
    save_file(state, str(tmp_path / "gumbel.safetensors"))
    assert "Gumbel" in one_line_error(tmp_path / "gumbel.safetensors")
    state = kl.original_state()
    state["encoder.conv_in.weight"] = state["encoder.conv_in.weight"][:, :, None].repeat(1, 1, 3, 1, 1)
    save_file(state, str(tmp_path / "video.safetensors"))
    assert "2-D" in one_line_error(tmp_path / "video.safetensors")


def test_corrupt_and_missing_files(kl, tmp_path):
    path = write_original_safetensors(tmp_path, kl)
    path.write_bytes(path.read_bytes()[:-100])
    assert "truncated" in one_line_error(path)
    (tmp_path / "junk.ckpt").write_bytes(b"this is not a checkpoint at all")
    assert "not a readable PyTorch checkpoint" in one_line_error(tmp_path / "junk.ckpt")
    (tmp_path / "junk.bin").write_bytes(b"PK\x03\x04 a zip that is not a checkpoint")
    assert "not a readable PyTorch checkpoint" in one_line_error(tmp_path / "junk.bin")
    assert "no such file" in one_line_error(tmp_path / "absent.ckpt")
    (tmp_path / "empty").mkdir()
    assert "not a diffusers model" in one_line_error(tmp_path / "empty")


class BoobyTrap:
    """Unpickling this would create a marker file (if the loader ran the pickle's code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("how", ["torch-zip", "torch-legacy", "plain-pickle", "lightning-state"])
def test_booby_trapped_pickle_is_refused_and_never_runs(how, kl, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    payload = {**kl.original_state(), "evil": BoobyTrap(marker)}
    if how == "torch-zip":
        torch.save(payload, path)
    elif how == "torch-legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    elif how == "plain-pickle":  # (tensors pickled without torch.save would be refused first)
        path.write_bytes(pickle.dumps({"evil": BoobyTrap(marker)}, protocol=2))
    else:
        torch.save({"state_dict": kl.original_state(), "hyper_parameters": BoobyTrap(marker)}, path)
    # the trap is real: plain unpickling would spring it
    assert not marker.exists()
    message = one_line_error(path)
    assert "refused" in message and "posix.mkdir" in message
    assert not marker.exists()


def test_booby_trap_would_fire_under_plain_pickle(tmp_path):
    """Control: the same payload does run code when unpickled without the restrictions."""
    marker = tmp_path / "pwned"
    data = pickle.dumps(BoobyTrap(marker))
    pickle.loads(data)  # noqa: S301 - deliberately, on data this test just made
    assert marker.exists()


def test_old_lightning_callback_keys_are_allowed_as_placeholders(kl, tmp_path, monkeypatch):
    """Old Lightning checkpoints key their callback state by the callback class; that must load."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": names[-1]})
    sys.modules[names[-1]].ModelCheckpoint = ModelCheckpoint
    ckpt = lightning_ckpt(kl.original_state())
    ckpt["callbacks"] = {ModelCheckpoint: {"best_model_score": torch.tensor(0.5), "best_model_path": "x.ckpt"}}
    torch.save(ckpt, tmp_path / "lightning.ckpt")
    for name in names:
        monkeypatch.delitem(sys.modules, name)
    kl.check(load_checkpoint(tmp_path / "lightning.ckpt"))


# --- conversion --------------------------------------------------------------------------------


def assert_same_weights(a: AutoEncoder, b: AutoEncoder) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("ref_name", ["kl", "vq"])
def test_convert_round_trip_native_diffusers_native_is_bit_exact(ref_name, request, tmp_path):
    ref: Reference = request.getfixturevalue(ref_name)
    native = write_native(tmp_path, ref)
    original = load_checkpoint(native)
    _, fmt = convert_checkpoint(native, tmp_path / "as-diffusers")
    assert fmt == "diffusers"
    _, fmt = convert_checkpoint(tmp_path / "as-diffusers", tmp_path / "back.safetensors")
    assert fmt == "vqcli"
    back = load_checkpoint(tmp_path / "back.safetensors")
    assert_same_weights(original, back)
    assert back.config == original.config
    assert back.identity() == original.identity()


@pytest.mark.parametrize("ref_name", ["kl", "vq"])
def test_converted_folder_loads_in_diffusers_and_reproduces_it(ref_name, request, tmp_path):
    import diffusers

    ref: Reference = request.getfixturevalue(ref_name)
    convert_checkpoint(write_original_safetensors(tmp_path, ref), tmp_path / "out", to="diffusers")
    cls = diffusers.AutoencoderKL if ref.config.kind == "kl" else diffusers.VQModel
    reloaded = cls.from_pretrained(tmp_path / "out").eval()
    expected = ref.dmodel.state_dict()
    assert reloaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in reloaded.state_dict().items())
    with torch.no_grad():
        assert (reloaded.decode(ref.z).sample - ref.decoded).abs().max().item() <= TOL


def test_convert_keeps_half_precision_and_converts_on_request(kl, tmp_path):
    save_file({k: v.half() for k, v in kl.original_state().items()}, str(tmp_path / "half.safetensors"))
    model, _ = convert_checkpoint(tmp_path / "half.safetensors", tmp_path / "half-native.safetensors")
    assert model.encoder.conv_in.weight.dtype == torch.float16
    convert_checkpoint(tmp_path / "half-native.safetensors", tmp_path / "half-diffusers")
    back, _ = convert_checkpoint(tmp_path / "half-diffusers", tmp_path / "again.safetensors")
    assert_same_weights(model, back)
    full, _ = convert_checkpoint(tmp_path / "half.safetensors", tmp_path / "full.safetensors", dtype="float32")
    assert full.encoder.conv_in.weight.dtype == torch.float32


def test_convert_refuses_to_overwrite_unless_asked(kl, tmp_path):
    src = write_original_safetensors(tmp_path, kl)
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"precious")
    with pytest.raises(FileError, match="already exists"):
        convert_checkpoint(src, dst)
    assert dst.read_bytes() == b"precious"
    with pytest.raises(FileError, match="not written by vqcli"):  # --overwrite replaces vqcli's own files only
        convert_checkpoint(src, dst, overwrite=True)
    assert dst.read_bytes() == b"precious"
    dst.unlink()
    convert_checkpoint(src, dst)
    convert_checkpoint(src, dst, overwrite=True)
    kl.check(load_checkpoint(dst))

    folder = tmp_path / "folder"
    convert_checkpoint(src, folder)
    with pytest.raises(FileError, match="already exists"):
        convert_checkpoint(src, folder)
    convert_checkpoint(src, folder, overwrite=True)
    (folder / "unet.safetensors").write_bytes(b"")
    with pytest.raises(FileError, match="holds other files"):
        convert_checkpoint(src, folder, overwrite=True)
    assert (folder / "unet.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".vqcli-tmp-")]


def test_convert_to_diffusers_refuses_what_diffusers_cannot_express(kl, tmp_path):
    model = AutoEncoder(TINY_KL.replace(resamp_with_conv=False))
    save_native(model, tmp_path / "avgpool.safetensors")
    with pytest.raises(FileError, match="resamp_with_conv"):
        convert_checkpoint(tmp_path / "avgpool.safetensors", tmp_path / "out", to="diffusers")
    assert not (tmp_path / "out").exists()


# --- the CLI -----------------------------------------------------------------------------------


def run_vqcli(*args: str) -> subprocess.CompletedProcess:
    """The installed ``vqcli`` command, in a subprocess (as users run it)."""
    exe = Path(sys.executable).parent / "vqcli"
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "vqcli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_installed_command_converts_and_reports_bad_files(kl, tmp_path):
    src = write_lightning_ckpt(tmp_path, kl)
    done = run_vqcli("convert", str(src), "-o", str(tmp_path / "vae-diffusers"), "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["format"] == "diffusers" and summary["config"]["ch_mult"] == list(TINY_KL.ch_mult)
    kl.check(load_checkpoint(tmp_path / "vae-diffusers"))

    evil = tmp_path / "evil.ckpt"
    torch.save({"x": BoobyTrap(tmp_path / "pwned")}, evil)
    done = run_vqcli("convert", str(evil), "-o", str(tmp_path / "evil.safetensors"))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(evil) in lines[0] and "refused" in lines[0]
    assert "Traceback" not in done.stderr and not (tmp_path / "pwned").exists()
    assert not (tmp_path / "evil.safetensors").exists()

    done = run_vqcli("convert", str(src), "-o", str(tmp_path / "vae-diffusers"))
    assert done.returncode == 1 and "already exists" in done.stderr


def test_models_command_lists_presets_and_embedded_models(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from vqcli.cli import app

    monkeypatch.setenv("VQCLI_WEIGHTS_DIR", str(tmp_path))
    save_native(AutoEncoder(TINY_VQ), tmp_path / "default-vq.safetensors")  # and no default.safetensors
    result = CliRunner().invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    assert {p["name"]: p["scale_factor"] for p in listing["presets"]} == {
        "sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025, "sd3": 1.5305, "flux": 0.3611, "ldm": 1.0, "taming": 1.0
    }
    embedded = {e["name"]: e for e in listing["embedded"]}
    assert embedded["default"]["installed"] is False
    assert embedded["default-vq"]["installed"] is True and "VQ f2" in embedded["default-vq"]["architecture"]
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0 and "not installed" in result.output


def test_convert_command_in_process(kl, tmp_path):
    from typer.testing import CliRunner

    from vqcli.cli import app

    src = write_single_diffusers_file(tmp_path, kl)
    result = CliRunner().invoke(app, ["convert", str(src), "-o", str(tmp_path / "n.safetensors"), "--scale-factor", "0.5"])
    assert result.exit_code == 0, result.output
    model = load_checkpoint(tmp_path / "n.safetensors")
    assert model.config.scale_factor == 0.5
    kl.check(model)
    result = CliRunner().invoke(app, ["convert", str(src), "-o", str(tmp_path / "m.safetensors"), "--preset", "nope"])
    assert result.exit_code == 2 and "choose from" in result.output
