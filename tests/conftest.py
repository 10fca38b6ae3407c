"""Shared test fixtures: tiny model configs and their diffusers twins (the independent oracle).

Organisation (add new shared fixtures under a heading of their own):

* tiny configs: ``tiny_kl_config``, ``tiny_vq_config`` (fixtures) and ``TINY_*`` (module constants
  for parametrisation);
* diffusers twins: ``make_diffusers(config, seed)`` builds a diffusers ``AutoencoderKL`` /
  ``VQModel`` equivalent to a vqcli config, every parameter (norms and biases included) randomised
  so that a wrong mapping cannot pass; ``vqcli_twin(dmodel, config)`` copies its weights into a
  vqcli ``AutoEncoder``;
* inputs: ``images(batch, height, width, seed)``: random images in [-1, 1]; ``photo_crops``: a
  folder of square crops of a sample photograph (training tests);
* signals: ``ctrl_c_raises``: Python's Ctrl-C handler installed for the test.

The diffusers models are built here from their own constructor arguments, independently of
vqcli's code that writes diffusers configs, so tests can compare the two.
"""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqcli.model.autoencoder import AutoEncoder, load_strict
from vqcli.model.config import AutoEncoderConfig

# --- tiny configs ------------------------------------------------------------------------------

# f4 KL with attention at level 1 (besides the middle one), 4 latent channels.
TINY_KL = AutoEncoderConfig(
    kind="kl", ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,), z_channels=4, resolution=32
)
# f2 VQ with attention at level 0, a 64-entry codebook of dimension 4 from 3 encoder channels.
TINY_VQ = AutoEncoderConfig(
    kind="vq", ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(32,), z_channels=3, embed_dim=4,
    n_embed=64, resolution=32,
)


@pytest.fixture
def tiny_kl_config() -> AutoEncoderConfig:
    return TINY_KL


@pytest.fixture
def tiny_vq_config() -> AutoEncoderConfig:
    return TINY_VQ


# --- randomised weights ------------------------------------------------------------------------


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter random values of a sensible scale, in place.

    Matrices and kernels: normal with std 1/sqrt(fan_in); norm scales: 1 + 0.3 N(0,1); biases and
    norm shifts: 0.1 N(0,1). Nothing keeps its default (ones, zeros), so a swapped or dropped
    norm/bias shows up in the outputs.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters()):
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if p.ndim >= 2:
            p.copy_(noise * p[0].numel() ** -0.5)
        elif name.endswith("weight"):
            p.copy_(1.0 + 0.3 * noise)
        else:
            p.copy_(0.1 * noise)
    return module


def attention_levels(config: AutoEncoderConfig) -> list[int]:
    """Levels with attention, computed here the way the original Encoder does (halving per level)."""
    levels, res = [], config.resolution
    for i in range(len(config.ch_mult)):
        if res in config.attn_resolutions:
            levels.append(i)
        res //= 2
    return levels


def build_diffusers(config: AutoEncoderConfig, seed: int = 0) -> torch.nn.Module:
    """A diffusers AutoencoderKL / VQModel with ``config``'s architecture and random weights."""
    import diffusers
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.upsampling import Upsample2D

    n = len(config.ch_mult)
    attn = attention_levels(config)
    common = dict(
        in_channels=config.in_channels,
        out_channels=config.out_ch,
        down_block_types=tuple("AttnDownEncoderBlock2D" if i in attn else "DownEncoderBlock2D" for i in range(n)),
        # diffusers' up_blocks run lowest resolution first: up block k is level n-1-k
        up_block_types=tuple("AttnUpDecoderBlock2D" if n - 1 - k in attn else "UpDecoderBlock2D" for k in range(n)),
        block_out_channels=tuple(config.ch * m for m in config.ch_mult),
        layers_per_block=config.num_res_blocks,
        latent_channels=config.z_channels,
        sample_size=config.resolution,
        mid_block_add_attention=config.mid_attention,
    )
    torch.manual_seed(seed)
    if config.kind == "kl":
        model = diffusers.AutoencoderKL(
            **common, use_quant_conv=config.use_quant_conv, use_post_quant_conv=config.use_post_quant_conv
        )
    else:
        model = diffusers.VQModel(**common, num_vq_embeddings=config.n_embed, vq_embed_dim=config.embed_dim)
    if not config.resamp_with_conv:
        for block in model.encoder.down_blocks:
            if block.downsamplers is not None:
                c = block.resnets[-1].out_channels
                block.downsamplers[0] = Downsample2D(c, use_conv=False, out_channels=c, padding=0)
        for block in model.decoder.up_blocks:
            if block.upsamplers is not None:
                c = block.resnets[-1].out_channels
                block.upsamplers[0] = Upsample2D(c, use_conv=False, out_channels=c)
    return randomize_(model, seed).eval()


def seed_codebook_(dmodel: torch.nn.Module, x: torch.Tensor, seed: int = 0) -> None:
    """Set a diffusers VQModel's codebook to encoder outputs of ``x`` plus noise.

    A random codebook far from the encoder's outputs would map every vector to the same few codes
    and test little; codes drawn from the outputs give many distinct indices.
    """
    with torch.no_grad():
        h = dmodel.encode(x).latents
        flat = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
        g = torch.Generator().manual_seed(seed)
        rows = torch.randint(0, flat.shape[0], (dmodel.quantize.n_e,), generator=g)
        noise = 0.05 * flat.std() * torch.randn(dmodel.quantize.n_e, h.shape[1], generator=g)
        dmodel.quantize.embedding.weight.copy_(flat[rows] + noise)


def vqcli_twin(dmodel: torch.nn.Module, config: AutoEncoderConfig) -> AutoEncoder:
    """A vqcli AutoEncoder holding ``dmodel``'s weights, mapped with ``vqcli.layouts`` and loaded strictly."""
    from vqcli.checkpoints.layouts import to_original

    model = AutoEncoder(config)
    load_strict(model, to_original(dmodel.state_dict()), "diffusers twin")
    return model.eval()


@pytest.fixture
def make_diffusers():
    """``make_diffusers(config, seed=0)``: see ``build_diffusers``."""
    return build_diffusers


@pytest.fixture
def seed_codebook():
    """``seed_codebook(dmodel, x, seed=0)``: see ``seed_codebook_``."""
    return seed_codebook_


@pytest.fixture
def make_twin():
    """``make_twin(dmodel, config)``: see ``vqcli_twin``."""
    return vqcli_twin


# --- inputs ------------------------------------------------------------------------------------


def random_images(batch: int, height: int, width: int, seed: int = 0, channels: int = 3) -> torch.Tensor:
    """Random images in [-1, 1], smooth enough to look like something (sums of two noise scales)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, channels, (height + 3) // 4, (width + 3) // 4, generator=g)
    coarse = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    fine = torch.rand(batch, channels, height, width, generator=g)
    return (0.7 * coarse + 0.3 * fine) * 2 - 1


@pytest.fixture
def images():
    """``images(batch, height, width, seed=0)``: see ``random_images``."""
    return random_images


def photo_crops(folder: Path, photo: str, corners: list[tuple[int, int]], side: int) -> Path:
    """``folder`` holding ``p0.png``, ``p1.png``...: the ``side``-pixel squares of
    ``sample_images/<photo>`` whose top-left corners (row, column) are ``corners``."""
    rgb = np.asarray(Image.open(Path(__file__).resolve().parents[1] / "sample_images" / photo).convert("RGB"))
    for i, (y, x) in enumerate(corners):
        Image.fromarray(rgb[y : y + side, x : x + side]).save(folder / f"p{i}.png")
    return folder


# --- signals -----------------------------------------------------------------------------------


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt during the test, whatever pytest started with: a process
    started as a background job of a non-interactive shell (``nohup pytest &``, some CI runners)
    has SIGINT ignored, and Python then installs no handler of its own."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
