"""The one table of known model families (presets: architecture and latent conventions) and of
vqcli's embedded models (name, file, training architecture; descriptions come from the config).

A preset names a family whose latents follow a convention: diffusion-ready latent
``(z - shift_factor) * scale_factor``. Where a family has one architecture (the Stable Diffusion,
SD3 and FLUX VAEs), the preset states it, so that a checkpoint's shapes can be recognised; the ldm
and taming presets cover many architectures and state only the factors.

Shapes cannot tell every family apart: SD 1.x/2.x and SDXL share one architecture with different
scale factors, and so do SD3 and FLUX. A checkpoint whose config states its factors settles it;
otherwise the first matching preset below is used, a warning says so, and ``preset=...`` chooses.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from vqcli.errors import ConfigError, FileError, UsageError
from vqcli.io.safetensors import read_safetensors_header
from vqcli.model.config import AutoEncoderConfig, architecture_key, describe

log = logging.getLogger(__name__)


# The Stable Diffusion VAE (kl-f8 of latent diffusion): used by SD 1.x, 2.x and XL.
_SD_VAE = AutoEncoderConfig(kind="kl", ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4)


# SD3 and FLUX.1: the same network with 16 latent channels and no quant_conv / post_quant_conv.
_Z16_VAE = AutoEncoderConfig(
    kind="kl", ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16, use_quant_conv=False, use_post_quant_conv=False
)


@dataclass(frozen=True)
class Preset:
    """A model family: its latent scale and shift and, where it has only one, its architecture."""

    name: str
    title: str
    scale_factor: float
    shift_factor: float = 0.0
    architecture: AutoEncoderConfig | None = None  # None: any architecture of this family

    def matches(self, config: AutoEncoderConfig) -> bool:
        """True when ``config`` has this preset's architecture (always, for architecture-free presets)."""
        return self.architecture is None or architecture_key(config) == architecture_key(self.architecture)

    def apply(self, config: AutoEncoderConfig) -> AutoEncoderConfig:
        """``config`` with this preset's factors and name."""
        return config.replace(scale_factor=self.scale_factor, shift_factor=self.shift_factor, name=self.name)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("sd1", "Stable Diffusion 1.x VAE", 0.18215, architecture=_SD_VAE),
        Preset("sd2", "Stable Diffusion 2.x VAE", 0.18215, architecture=_SD_VAE),
        Preset("sdxl", "Stable Diffusion XL VAE", 0.13025, architecture=_SD_VAE),
        Preset("sd3", "Stable Diffusion 3 / 3.5 VAE", 1.5305, 0.0609, architecture=_Z16_VAE),
        Preset("flux", "FLUX.1 autoencoder", 0.3611, 0.1159, architecture=_Z16_VAE),
        Preset("ldm", "latent-diffusion first-stage model (KL or VQ)", 1.0),
        Preset("taming", "taming-transformers VQGAN", 1.0),
    )
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``, or a ``UsageError`` listing the choices."""
    try:
        return PRESETS[name.strip().lower()]
    except KeyError:
        raise UsageError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None


def presets_for(config: AutoEncoderConfig) -> list[Preset]:
    """Presets whose stated architecture is exactly ``config``'s, in the order of ``PRESETS``."""
    return [p for p in PRESETS.values() if p.architecture is not None and p.matches(config)]


def preset_with_factors(config: AutoEncoderConfig, scale: float, shift: float) -> Preset | None:
    """The preset matching ``config``'s architecture and these factors, if any (recognition from config.json)."""
    for p in presets_for(config):
        if abs(p.scale_factor - scale) < 1e-6 and abs(p.shift_factor - shift) < 1e-6:
            return p
    return None


def guess_preset(config: AutoEncoderConfig) -> Preset | None:
    """The preset for a checkpoint that does not state its factors: the first matching architecture.

    Logs a warning when other matching presets have different factors (SD 1.x vs SDXL, SD3 vs
    FLUX), naming them, because then the choice is a guess that only ``preset=...`` can settle.
    """
    candidates = presets_for(config)
    if not candidates:
        return None
    chosen = candidates[0]
    differing = [p.name for p in candidates if (p.scale_factor, p.shift_factor) != (chosen.scale_factor, chosen.shift_factor)]
    if differing:
        log.warning(
            "the weights fit presets %s, whose latent factors differ; using %s (scale %g, shift %g). "
            "Choose with --preset.",
            ", ".join(p.name for p in candidates),
            chosen.name,
            chosen.scale_factor,
            chosen.shift_factor,
        )
    return chosen


# --- embedded models ---------------------------------------------------------------------------

WEIGHTS_ENV = "VQCLI_WEIGHTS_DIR"  # another folder of embedded weights (tests, re-trained models)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside the package, usable by name (``--model default``).

    ``architecture`` is what ``vqcli train --preset NAME`` trains; the shipped file's own config
    (its metadata) is what describes the model, so a description never drifts from the weights.
    """

    name: str
    architecture: AutoEncoderConfig

    @property
    def path(self) -> Path:
        return embedded_path(self.name)

    @property
    def installed(self) -> bool:
        return self.path.is_file()

    @property
    def description(self) -> str:
        """What the shipped weights are, from their config (the training architecture when missing)."""
        try:
            config = embedded_config(self) or self.architecture
        except FileError:
            config = self.architecture
        return f"vqcli's own {describe(config)}"


EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        # KL, f4, 4 latent channels: 12x fewer latent values than RGB values. ch 64 puts two
        # channels in every GroupNorm group at full resolution; with ch 32 (one channel a group)
        # the decoder's last norm removed each channel's image-wide mean, and with it the colour of
        # large flat areas. No middle attention: at f4 a 512x512 image has 16,384 latent
        # positions, and attention over all of them cost half the float32 time.
        EmbeddedModel("default", AutoEncoderConfig(
            kind="kl", ch=64, ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=4, mid_attention=False, name="default"
        )),
        # VQ, f4, 1024 codes of dimension 4: 48x fewer codes than RGB values.
        EmbeddedModel("default-vq", AutoEncoderConfig(
            kind="vq", ch=64, ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=4, n_embed=1024, name="default-vq"
        )),
    )
}
EMBEDDED_MODELS = tuple(EMBEDDED)


def weights_dir() -> Path:
    """Where the embedded models live."""
    env = os.environ.get(WEIGHTS_ENV)
    return Path(env) if env else Path(__file__).resolve().parent.parent / "weights"


def embedded_path(name: str) -> Path:
    return weights_dir() / f"{name}.safetensors"


def is_embedded(spec: str) -> bool:
    return spec in EMBEDDED


def embedded_config(model: EmbeddedModel) -> AutoEncoderConfig | None:
    """The config stored in an installed embedded model's metadata (header only, no tensors read).

    ``None`` when the file is missing; a ``FileError`` when it is there but unreadable.
    """
    if not model.installed:
        return None
    header = read_safetensors_header(model.path)
    try:
        return AutoEncoderConfig.from_dict(json.loads((header.get("__metadata__") or {})["config"]))
    except (KeyError, TypeError, ValueError, ConfigError) as e:
        raise FileError(model.path, f"no valid vqcli config in its metadata ({e})") from None
