"""Reading the autoencoder checkpoints users already have, safely, into an ``AutoEncoder``.

Formats read (``load_checkpoint`` tells them apart by content, never by file name):

* vqcli's own ``.safetensors`` (config in the metadata; ``AutoEncoder.save``), and the training
  checkpoints ``vqcli train`` writes (their EMA weights).
* The original ldm / sgm / taming layout in ``.safetensors``, ``.ckpt``, ``.pt`` or ``.pth``: bare
  ``encoder.``/``decoder.``/``quant_conv.``/``post_quant_conv.``/``quantize.`` keys, or a full model
  checkpoint with the autoencoder under ``first_stage_model.`` or ``vae.``; Lightning ``.ckpt``
  files with a ``state_dict`` entry. Ignored (documented, and counted in ``Checkpoint.ignored``):
  every key outside the autoencoder's prefix (UNet, text encoders, EMA copies), ``loss.*`` (LPIPS
  and discriminator weights), and the non-weight entries of a ``.ckpt`` (optimizer state, epoch...).
  A YAML config beside the weights (``<name>.yaml``, ``config.yaml``, ``model.yaml``, or the only
  YAML in ``../configs/`` as taming's logs have it) is read and checked when present.
* diffusers ``AutoencoderKL`` / ``VQModel`` folders (``config.json`` and
  ``diffusion_pytorch_model.safetensors`` or ``.bin``; a pipeline folder's ``vae/`` or ``vqvae/``
  is found), and single diffusers-layout files.

The architecture comes from the tensor shapes alone (``infer_config``); a config file, where there
is one, is checked against it and supplies what shapes cannot (nominal resolution, latent factors).
Loading is strict: zero missing and zero unexpected keys, or a ``FileError`` listing them.

Safety: pickles are read only by ``torch.load(weights_only=True)``, memory-mapped when the file is
in the zip format, with an allow-list of one kind of harmless placeholder (the callback classes
old PyTorch Lightning checkpoints name as dictionary keys). A pickle that names anything else is
refused, and nothing in it runs. Weights keep the file's dtype unless ``dtype`` says otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import pickle
import re
import reprlib
import shutil
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .autoencoder import FORMAT as NATIVE_FORMAT
from .autoencoder import AutoEncoder, AutoEncoderConfig, load_strict
from .devices import DTYPES
from .errors import ConfigError, FileError, UsageError
from .fileio import as_os_error, current_umask, make_temp_dir
from .layouts import DIFFUSERS, detect_layout, select_autoencoder, to_diffusers, to_original
from .native import check_weights, read_native, read_safetensors_header, short_name
from .presets import EMBEDDED, architecture_key, attention_levels, get_preset, guess_preset, preset_with_factors

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
)
DIFFUSERS_SUBFOLDERS = ("vae", "vqvae")
DIFFUSERS_CLASSES = {"AutoencoderKL": "kl", "VQModel": "vq"}
DIFFUSERS_VERSION_WRITTEN = "0.30.0"  # the oldest diffusers that reads every field we write
TRAIN_CHECKPOINT_FORMAT = "vqcli.train-checkpoint"  # see vqcli/train.py


@dataclass
class Checkpoint:
    """A checkpoint read and understood, before a model is built from it."""

    path: Path  # the file (or folder) the weights came from
    format: str  # "vqcli", "original" or "diffusers"
    config: AutoEncoderConfig  # architecture, plus the latent factors when the file states them
    state: dict[str, torch.Tensor]  # the autoencoder's weights in the original (vqcli) layout
    ignored: int = 0  # keys of the file that are not the autoencoder's (see module docstring)
    factors_stated: bool = False  # scale and shift came from the file's own config


# --- public entry points -----------------------------------------------------------------------


def load_checkpoint(
    path: str | os.PathLike,
    *,
    preset: str | None = None,
    scale_factor: float | None = None,
    shift_factor: float | None = None,
    dtype: torch.dtype | str | None = None,
    config_path: str | os.PathLike | None = None,
) -> AutoEncoder:
    """An ``AutoEncoder`` (CPU, eval mode) from any supported checkpoint file or folder.

    ``path`` may also name an embedded model (``default``, ``default-vq``) when no such file exists.
    ``preset`` chooses the family where shapes are ambiguous (and must fit the weights);
    ``scale_factor`` / ``shift_factor`` override whatever the file or preset says. ``dtype``
    (``torch.float32``, ``"bfloat16"``, ...) converts the weights; by default they keep the file's.
    ``config_path`` names a YAML or config.json to check against instead of looking beside the file.
    """
    ckpt = read_checkpoint(path, config_path=config_path)
    config = apply_conventions(ckpt, preset=preset, scale_factor=scale_factor, shift_factor=shift_factor)
    return build_model(config, ckpt.state, source=ckpt.path, dtype=dtype)


def read_checkpoint(path: str | os.PathLike, *, config_path: str | os.PathLike | None = None) -> Checkpoint:
    """Read and understand a checkpoint: its format, architecture and weights (original layout)."""
    p = Path(path)
    if not p.exists():
        p = _embedded_path(str(path)) or p
        if not p.exists():
            raise FileError(p, "no such file or folder")
    extra = Path(config_path) if config_path is not None else None
    if extra is not None and not extra.is_file():
        raise FileError(extra, "config file not found")
    if p.is_dir():
        return _read_diffusers_folder(p, config_path=extra)
    if p.suffix.lower() in (".yaml", ".yml", ".json"):
        raise FileError(p, "this is a config file; give the weights file, or the folder that holds config.json")
    if p.name.startswith("diffusion_pytorch_model") and (p.parent / "config.json").is_file():
        return _read_diffusers_folder(p.parent, weights=p, config_path=extra)

    if _is_safetensors(p):
        header = read_safetensors_header(p)
        if (header.get("__metadata__") or {}).get("format") == NATIVE_FORMAT:
            config, state = read_native(p)
            return Checkpoint(p, "vqcli", config, state, factors_stated=True)
        state, ignored = _read_safetensors_selection(p, [k for k in header if k != "__metadata__"])
    else:
        obj = _safe_torch_load(p)
        if isinstance(obj, Mapping) and obj.get("format") == TRAIN_CHECKPOINT_FORMAT:
            return _read_train_checkpoint(p, obj)
        state, ignored = _select(_tensors_of(obj, p), p)

    layout = _layout_or_error(state, p)
    state = _to_original(state, p)
    config = infer_config(state, source=p)
    stated = False
    if layout == DIFFUSERS:
        if extra is not None and extra.suffix.lower() == ".json":
            config, stated = check_diffusers_config(_read_json(extra), config, extra)
    else:
        yaml_path = extra or find_yaml_config(p)
        if yaml_path is not None and extra is None and importlib.util.find_spec("yaml") is None:
            log.warning("%s: not checked against %s: reading YAML needs PyYAML (pip install pyyaml)", p, yaml_path)
            yaml_path = None
        if yaml_path is not None:
            config, stated = check_yaml_config(yaml_path, config, explicit=extra is not None)
    config = config.replace(name=config.name or p.stem)
    return Checkpoint(p, layout, config, state, ignored=ignored, factors_stated=stated)


def apply_conventions(
    ckpt: Checkpoint,
    *,
    preset: str | None = None,
    scale_factor: float | None = None,
    shift_factor: float | None = None,
) -> AutoEncoderConfig:
    """The checkpoint's config with its latent factors settled.

    In order: an explicit ``preset`` (which must fit the architecture); else the file's own stated
    factors; else the first preset with this exact architecture (a warning when that is a guess);
    else 1.0 and 0.0, the ldm / taming convention. Explicit factors override all of these.
    """
    config = ckpt.config
    if preset is not None:
        chosen = get_preset(preset)
        if not chosen.matches(config):
            raise FileError(
                ckpt.path,
                f"preset {chosen.name} ({chosen.title}) does not fit these weights: "
                f"it expects {describe(chosen.architecture)}, the file has {describe(config)}",
            )
        config = chosen.apply(config)
    elif not ckpt.factors_stated:
        guessed = guess_preset(config)
        if guessed is not None:
            config = guessed.apply(config)
    changes: dict[str, float] = {}
    if scale_factor is not None:
        changes["scale_factor"] = float(scale_factor)
    if shift_factor is not None:
        changes["shift_factor"] = float(shift_factor)
    try:
        return config.replace(**changes) if changes else config
    except ConfigError as e:
        raise UsageError(str(e)) from None


def build_model(
    config: AutoEncoderConfig,
    state: Mapping[str, torch.Tensor],
    *,
    source: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
) -> AutoEncoder:
    """An ``AutoEncoder`` holding ``state`` exactly (strict), in ``dtype`` or the weights' own dtype.

    The model is created on the meta device and materialised empty, so no time goes into random
    initialisation that the strict load then overwrites entirely. The weights are checked first
    (``native.check_weights``: keys, shapes, floating dtypes, finite values), so nothing is
    allocated for weights that cannot load.
    """
    check_weights(config, dict(state), source)  # before allocating what the config asks for
    target = _as_dtype(dtype) if dtype is not None else _dominant_dtype(state)
    with torch.device("meta"):
        model = AutoEncoder(config)
    model = model.to(target).to_empty(device="cpu")
    load_strict(model, dict(state), source)
    return model.eval()


def describe(config: AutoEncoderConfig | None) -> str:
    """A one-line summary of an architecture, for messages and listings."""
    if config is None:
        return "any architecture"
    parts = [
        f"{config.kind.upper()} f{config.downsampling}",
        f"ch {config.ch} x ({','.join(map(str, config.ch_mult))})",
        f"{config.num_res_blocks} res block{'s' if config.num_res_blocks > 1 else ''}",
        f"z {config.z_channels}",
    ]
    if config.embed_dim != config.z_channels:
        parts.append(f"embed {config.embed_dim}")
    if config.kind == "vq":
        parts.append(f"{config.n_embed} codes")
    levels = attention_levels(config)
    if levels:
        parts.append(f"attention at levels {','.join(map(str, levels))}")
    if not (config.use_quant_conv or config.use_post_quant_conv):
        parts.append("no quant convs")
    elif not (config.use_quant_conv and config.use_post_quant_conv):
        parts.append("quant_conv" if config.use_quant_conv else "post_quant_conv only")
    return ", ".join(parts)


# --- architecture from shapes ------------------------------------------------------------------

_NOMINAL_RESOLUTION = 256


def infer_config(state: Mapping[str, torch.Tensor], *, source: str | os.PathLike) -> AutoEncoderConfig:
    """The architecture of an original-layout state dict, from tensor shapes alone.

    Attention placement is known per level; it is expressed as ``attn_resolutions`` for a nominal
    ``resolution`` (256, or more for very deep models), which a config file may later replace.
    """

    def need(key: str, ndim: int = 4) -> torch.Tensor:
        """The tensor ``key``: a 2-D convolution's (out, in, kh, kw) weight, or ``ndim`` non-empty sizes."""
        if key not in state:
            raise FileError(source, f"not an autoencoder of this family: {key} is missing ({_key_summary(state)})")
        t = state[key]
        if t.ndim != ndim or 0 in t.shape:
            what = "a 2-D convolution's weight" if ndim == 4 else f"a {ndim}-D tensor"
            raise FileError(source, f"{key} has shape {tuple(t.shape)}, not that of {what}")
        return t

    conv_in = state.get("encoder.conv_in.weight")
    if conv_in is not None and conv_in.ndim == 5:
        raise FileError(
            source,
            f"encoder.conv_in.weight has shape {tuple(conv_in.shape)}: a 3-D convolution, "
            "but this family is 2-D (a video autoencoder?)",
        )
    conv_in = need("encoder.conv_in.weight")
    ch, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    levels = sorted(_indices(state, r"^encoder\.down\.(\d+)\.block\.0\.conv1\.weight$"))
    if not levels or levels != list(range(len(levels))):
        raise FileError(source, f"not an autoencoder of this family: encoder levels {levels} ({_key_summary(state)})")
    ch_mult = []
    for i in levels:
        width = int(need(f"encoder.down.{i}.block.0.conv1.weight").shape[0])
        if width % ch:
            raise FileError(source, f"encoder level {i} has {width} channels, not a multiple of conv_in's {ch}")
        ch_mult.append(width // ch)
    num_res_blocks = len(_indices(state, r"^encoder\.down\.0\.block\.(\d+)\.conv1\.weight$"))
    enc_attn = sorted(_indices(state, r"^encoder\.down\.(\d+)\.attn\."))
    dec_attn = sorted(_indices(state, r"^decoder\.up\.(\d+)\.attn\."))
    if enc_attn != dec_attn:
        raise FileError(
            source,
            f"attention sits at encoder levels {enc_attn} but decoder levels {dec_attn}; "
            "this family places it at the same levels in both",
        )
    mid_attn = [c for c in ("encoder", "decoder") if any(k.startswith(f"{c}.mid.attn_1.") for k in state)]
    if len(mid_attn) == 1:
        raise FileError(
            source,
            f"only the {mid_attn[0]} has a middle attention block (mid.attn_1); this family has it in both or neither",
        )
    z_channels = int(need("decoder.conv_in.weight").shape[1])
    enc_out = int(need("encoder.conv_out.weight").shape[0])
    out_ch = int(need("decoder.conv_out.weight").shape[0])
    if enc_out not in (z_channels, 2 * z_channels):
        raise FileError(
            source, f"the encoder puts out {enc_out} channels but the decoder takes {z_channels}: not one autoencoder"
        )
    quantizer = [k for k in state if k.startswith("quantize.")]
    kind = "vq" if "quantize.embedding.weight" in state else "kl"
    if quantizer and kind == "kl":
        raise FileError(
            source,
            f"its quantizer ({', '.join(sorted(quantizer)[:4])}) is not the taming VectorQuantizer "
            "(quantize.embedding.weight); Gumbel and other quantizers are not supported",
        )
    moments = 2 if kind == "kl" else 1
    use_quant_conv = "quant_conv.weight" in state
    use_post_quant_conv = "post_quant_conv.weight" in state
    if kind == "vq":
        need("quantize.embedding.weight", ndim=2)
    if use_quant_conv:
        embed_dim = int(need("quant_conv.weight").shape[0]) // moments
    elif use_post_quant_conv:
        embed_dim = int(need("post_quant_conv.weight").shape[1])
    elif kind == "vq":
        embed_dim = int(state["quantize.embedding.weight"].shape[1])
    else:
        embed_dim = z_channels
    resolution = max(_NOMINAL_RESOLUTION, 2 ** (len(levels) - 1))
    try:
        return AutoEncoderConfig(
            kind=kind,
            ch=ch,
            ch_mult=tuple(ch_mult),
            num_res_blocks=num_res_blocks,
            attn_resolutions=tuple(resolution // 2**i for i in enc_attn),
            z_channels=z_channels,
            embed_dim=embed_dim,
            double_z=enc_out == 2 * z_channels,
            n_embed=int(state["quantize.embedding.weight"].shape[0]) if kind == "vq" else 0,
            use_quant_conv=use_quant_conv,
            use_post_quant_conv=use_post_quant_conv,
            in_channels=in_channels,
            out_ch=out_ch,
            resolution=resolution,
            resamp_with_conv=len(levels) == 1 or "encoder.down.0.downsample.conv.weight" in state,
            mid_attention=bool(mid_attn),
        )
    except ConfigError as e:
        raise FileError(source, f"the weights' shapes describe no valid autoencoder: {e}") from None


def _indices(state: Mapping[str, Any], pattern: str) -> set[int]:
    rx = re.compile(pattern)
    return {int(m.group(1)) for k in state if (m := rx.match(k))}


def _key_summary(keys: Mapping[str, Any] | list[str], shown: int = 6) -> str:
    """What a file holds, grouped by the first two name components: ``encoder.layers (17 keys), ...``."""
    groups = Counter(".".join(str(k).split(".")[:2]) for k in keys)
    if not groups:
        return "it holds no tensors"
    parts = [f"{_plain(name)} ({n} key{'s' if n > 1 else ''})" for name, n in sorted(groups.items())[:shown]]
    more = f", and {len(groups) - shown} more groups" if len(groups) > shown else ""
    return "it holds " + ", ".join(parts) + more


def _plain(name: str) -> str:
    """A name from a file as it is when it is plain text, else quoted and escaped (one line, short)."""
    return name if name.isprintable() and len(name) <= 80 else short_name(name)


# --- config files ------------------------------------------------------------------------------


def check_diffusers_config(
    cfg: Mapping[str, Any], inferred: AutoEncoderConfig, source: str | os.PathLike
) -> tuple[AutoEncoderConfig, bool]:
    """Check a diffusers ``config.json`` against the inferred architecture; add what it states.

    Returns the config to use and whether it states the latent factors. Only fields present are
    checked. An ``AutoencoderKL``'s ``scaling_factor`` / ``shift_factor`` are taken; a ``VQModel``'s
    are not, because diffusers writes its default 0.18215 into every VQModel config whatever the
    model (ldm and taming VQ models use 1.0). A ``_vqcli_config`` entry (written by
    ``vqcli convert``) restores the full original config.
    """
    cls = cfg.get("_class_name")
    if cls not in DIFFUSERS_CLASSES:
        what = _plain(cls) if isinstance(cls, str) and cls else "model of unknown class"
        raise FileError(source, f"describes a {what}; vqcli reads AutoencoderKL and VQModel")
    try:
        return _check_diffusers_config(cfg, cls, inferred, source)
    except (TypeError, ValueError, ArithmeticError, AttributeError) as e:  # a value of the wrong type or size
        raise FileError(source, f"unreadable config.json ({_first_line(e)[:200]})") from None


def _check_diffusers_config(
    cfg: Mapping[str, Any], cls: str, inferred: AutoEncoderConfig, source: str | os.PathLike
) -> tuple[AutoEncoderConfig, bool]:
    expected: dict[str, Any] = {"kind": DIFFUSERS_CLASSES[cls]}
    unsupported = []
    if cfg.get("norm_num_groups", 32) != 32:
        unsupported.append(f"norm_num_groups {_repr(cfg['norm_num_groups'])}")
    if cfg.get("act_fn", "silu") != "silu":
        unsupported.append(f"act_fn {_repr(cfg['act_fn'])}")
    if cfg.get("norm_type", "group") != "group":
        unsupported.append(f"norm_type {_repr(cfg['norm_type'])}")
    down, up = cfg.get("down_block_types"), cfg.get("up_block_types")
    for types, allowed in ((down, ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")), (up, ("UpDecoderBlock2D", "AttnUpDecoderBlock2D"))):
        unsupported += [f"block type {_repr(t)}" for t in types or () if t not in allowed]
    if unsupported:
        raise FileError(source, "uses what this family does not have: " + ", ".join(unsupported))

    if "block_out_channels" in cfg:
        widths = [int(w) for w in cfg["block_out_channels"]]
        if not widths or min(widths) < 1:
            raise ValueError(f"block_out_channels {reprlib.repr(cfg['block_out_channels'])} are not positive widths")
        expected["ch"] = widths[0]
        expected["ch_mult"] = tuple(w // widths[0] for w in widths)
    for field_, key in (
        ("num_res_blocks", "layers_per_block"),
        ("z_channels", "latent_channels"),
        ("in_channels", "in_channels"),
        ("out_ch", "out_channels"),
        ("use_quant_conv", "use_quant_conv"),
        ("use_post_quant_conv", "use_post_quant_conv"),
        ("n_embed", "num_vq_embeddings"),
        ("mid_attention", "mid_block_add_attention"),
    ):
        if cfg.get(key) is not None:
            expected[field_] = cfg[key]
    if cls == "VQModel":
        expected["embed_dim"] = cfg.get("vq_embed_dim") or cfg.get("latent_channels", inferred.embed_dim)
    n = len(inferred.ch_mult)
    found = attention_levels(inferred)
    if down is not None:
        expected["attention levels (down_block_types)"] = tuple(i for i, t in enumerate(down) if "Attn" in t)
    if up is not None:
        expected["attention levels (up_block_types)"] = tuple(sorted(n - 1 - k for k, t in enumerate(up) if "Attn" in t))
    actual = {**_fields(inferred), "attention levels (down_block_types)": found, "attention levels (up_block_types)": found}
    _raise_mismatches(source, "config.json", expected, actual)

    own = cfg.get("_vqcli_config")
    if isinstance(own, Mapping):
        try:
            restored = AutoEncoderConfig.from_dict(dict(own))
        except (ConfigError, TypeError, ValueError) as e:
            raise FileError(source, f"bad _vqcli_config: {e}") from None
        if architecture_key(restored) != architecture_key(inferred):
            raise FileError(source, f"_vqcli_config describes {describe(restored)}, the weights {describe(inferred)}")
        return restored, True

    config = inferred
    size = cfg.get("sample_size")
    size = max(size) if isinstance(size, (list, tuple)) and size else size
    if isinstance(size, int) and size >= 2 ** (n - 1):
        config = config.replace(resolution=size, attn_resolutions=tuple(size // 2**i for i in found))
    if cfg.get("latents_mean") is not None or cfg.get("latents_std") is not None:
        log.warning("%s: per-channel latents_mean / latents_std are not applied by vqcli", source)
    if cls == "AutoencoderKL":
        scale = float(cfg.get("scaling_factor", 0.18215))
        shift = float(cfg.get("shift_factor") or 0.0)
        if not (math.isfinite(scale) and scale != 0 and math.isfinite(shift)):
            raise ValueError(f"scaling_factor {scale} and shift_factor {shift} must be finite, the scale not 0")
        known = preset_with_factors(config, scale, shift)
        config = config.replace(scale_factor=scale, shift_factor=shift, name=known.name if known else config.name)
        return config, True
    return config, False


def find_yaml_config(weights: Path) -> Path | None:
    """The YAML config that belongs to an original-layout weights file, if one lies where they are kept.

    Looked for, in order: ``<name>.yaml``/``.yml`` beside it, ``config.yaml`` or ``model.yaml`` beside
    it (ldm's model folders), and the only YAML in ``../configs/`` (taming's ``logs/<run>/checkpoints``).
    """
    folder = weights.parent
    for candidate in (
        weights.with_suffix(".yaml"),
        weights.with_suffix(".yml"),
        folder / "config.yaml",
        folder / "model.yaml",
    ):
        if candidate.is_file():
            return candidate
    configs = folder.parent / "configs"
    if folder.name == "checkpoints" and configs.is_dir():
        found = sorted(configs.glob("*.yaml"))
        if len(found) == 1:
            return found[0]
    return None


def check_yaml_config(
    path: Path, inferred: AutoEncoderConfig, *, explicit: bool = False
) -> tuple[AutoEncoderConfig, bool]:
    """Check an ldm / taming / sgm YAML against the inferred architecture; add what it states.

    Understands first-stage configs (``model.params.ddconfig``) and full latent-diffusion configs
    (``model.params.first_stage_config.params.ddconfig``, with ``model.params.scale_factor``).
    A YAML found automatically that describes no autoencoder is ignored; one given explicitly is
    an error. Returns the config to use and whether the YAML states the scale factor.
    """
    data = _read_yaml(path)
    found = _ldm_params(data)
    if found is None:
        if explicit:
            raise FileError(path, "describes no autoencoder (no ddconfig under model.params)")
        log.info("%s: not an autoencoder config; ignored", path)
        return inferred, False
    params, scale = found
    dd = params["ddconfig"]
    try:
        resolution = int(dd.get("resolution", inferred.resolution))
        attn_type = dd.get("attn_type", "vanilla")
        if attn_type not in ("vanilla", "vanilla-xformers", "none"):
            raise FileError(path, f"attn_type {_repr(attn_type)} is not supported (vanilla or none)")
        # ldm's attn_type "none": every attention block, the middle one included, is left out
        attn = () if attn_type == "none" else tuple(int(r) for r in dd.get("attn_resolutions") or ())
        yaml_levels = tuple(i for i in range(len(inferred.ch_mult)) if resolution // 2**i in attn)
        expected: dict[str, Any] = {
            k: (tuple(v) if k == "ch_mult" else v)
            for k, v in dd.items()
            if k in ("ch", "ch_mult", "num_res_blocks", "z_channels", "double_z", "in_channels", "out_ch")
        }
        if "embed_dim" in params:
            expected["embed_dim"] = int(params["embed_dim"])
        expected["kind"] = "vq" if "n_embed" in params else "kl"
        if "n_embed" in params:
            expected["n_embed"] = int(params["n_embed"])
        expected["mid_attention"] = attn_type != "none"
        expected["attention levels"] = yaml_levels
        dropout = float(dd.get("dropout", 0.0))
        scale = None if scale is None else float(scale)
        if scale is not None and not (math.isfinite(scale) and scale != 0):
            raise ValueError(f"scale_factor {scale} is not a finite, non-zero number")
    except (TypeError, ValueError, ArithmeticError, AttributeError) as e:
        raise FileError(path, f"unreadable ddconfig ({_first_line(e)[:200]})") from None
    _raise_mismatches(path, "the YAML config", expected, {**_fields(inferred), "attention levels": attention_levels(inferred)})
    try:
        config = inferred.replace(resolution=resolution, attn_resolutions=attn, dropout=dropout)
    except ConfigError as e:
        raise FileError(path, f"unusable ddconfig ({e})") from None
    if scale is not None:
        return config.replace(scale_factor=scale), True
    return config, False


def _ldm_params(data: Any) -> tuple[Mapping[str, Any], float | None] | None:
    model = data.get("model") if isinstance(data, Mapping) else None
    params = model.get("params") if isinstance(model, Mapping) else None
    if not isinstance(params, Mapping):
        return None
    if isinstance(params.get("ddconfig"), Mapping):
        return params, None
    first = params.get("first_stage_config")
    inner = first.get("params") if isinstance(first, Mapping) else None
    if isinstance(inner, Mapping) and isinstance(inner.get("ddconfig"), Mapping):
        return inner, params.get("scale_factor")
    return None


def _fields(config: AutoEncoderConfig) -> dict[str, Any]:
    return {**config.to_dict(), "ch_mult": config.ch_mult}


def _raise_mismatches(source: str | os.PathLike, what: str, expected: Mapping[str, Any], actual: Mapping[str, Any]) -> None:
    wrong = [f"{k} {_repr(v)} vs {_repr(actual.get(k))}" for k, v in expected.items() if actual.get(k) != v]
    if wrong:
        raise FileError(source, f"{what} does not match the weights ({what} vs weights): " + "; ".join(wrong))


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxstring, _SHORT_REPR.maxother = 2, 60, 60


def _repr(value: Any) -> str:
    """A short one-line repr of a value read from a file (which may be huge or deeply nested)."""
    text = _SHORT_REPR.repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise FileError(path, e.strerror or str(e)) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, huge integers
        raise FileError(path, f"not valid JSON ({_first_line(e)[:200]})") from None
    if not isinstance(data, dict):
        raise FileError(path, "not a JSON object")
    return data


def _read_yaml(path: Path) -> Any:
    try:
        import yaml
    except ImportError:
        raise FileError(path, "reading YAML configs needs PyYAML (pip install pyyaml)") from None
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise FileError(path, e.strerror or str(e)) from None
    except (UnicodeDecodeError, yaml.YAMLError, ValueError, RecursionError) as e:
        # ValueError: integers of more digits than Python converts; RecursionError: deep nesting
        raise FileError(path, f"not valid YAML ({_first_line(e)[:200]})") from None


# --- file formats ------------------------------------------------------------------------------


def _embedded_path(name: str) -> Path | None:
    model = EMBEDDED.get(name)
    if model is None:
        return None
    if not model.installed:
        raise FileError(name, f"embedded model is not installed (expected at {model.path})")
    return model.path


def _is_safetensors(path: Path) -> bool:
    """By content: PyTorch zips and pickles start with known bytes; anything else is tried as safetensors.

    A file named like a pickle (``.ckpt``, ...) without a pickle's signature must at least have a
    plausible safetensors header, else it is neither and that is the error.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise FileError(path, e.strerror or str(e)) from None
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return False
    if path.suffix.lower() in PICKLE_SUFFIXES:
        try:
            read_safetensors_header(path)
        except FileError:
            raise FileError(path, "not a readable PyTorch checkpoint (no pickle or zip signature), nor safetensors") from None
    return True


def _read_safetensors_selection(path: Path, keys: list[str]) -> tuple[dict[str, torch.Tensor], int]:
    """Only the autoencoder's tensors of a (possibly multi-gigabyte) safetensors file."""
    from safetensors import SafetensorError, safe_open

    selection = select_autoencoder(keys)
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {inner: f.get_tensor(key) for inner, key in selection.keys.items()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise FileError(path, f"not a readable safetensors file ({_first_line(e)})") from None
    if selection.ignored:
        log.info("%s: ignored %d keys outside the autoencoder", path, len(selection.ignored))
    return state, len(selection.ignored)


def _select(tensors: Mapping[str, torch.Tensor], path: Path) -> tuple[dict[str, torch.Tensor], int]:
    selection = select_autoencoder(tensors)
    if selection.ignored:
        log.info("%s: ignored %d keys outside the autoencoder", path, len(selection.ignored))
    return {inner: tensors[key] for inner, key in selection.keys.items()}, len(selection.ignored)


class _LightningCallbackKey:
    """Stands in for the callback classes old Lightning checkpoints use as dictionary keys.

    Only ever referenced (never called with file data in a way that runs code): allowing it lets
    ``weights_only`` read those checkpoints without importing or trusting Lightning.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass


_ALLOWED_PLACEHOLDERS = [
    (_LightningCallbackKey, f"{package}.callbacks.{module}.{cls}")
    for package in ("pytorch_lightning", "lightning.pytorch")
    for module, cls in (
        ("model_checkpoint", "ModelCheckpoint"),
        ("early_stopping", "EarlyStopping"),
        ("lr_monitor", "LearningRateMonitor"),
    )
]


def _safe_torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, memory-mapped for zip files; refusals become FileErrors."""
    try:
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"
    except OSError as e:
        raise FileError(path, e.strerror or str(e)) from None
    try:
        with torch.serialization.safe_globals(_ALLOWED_PLACEHOLDERS), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # torch's note, not the user's concern
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Weights only load failed" in text or "GLOBAL" in text:
            found = re.search(r"GLOBAL ([\w.]+)", text)
            opcode = re.search(r"Unsupported operand (\d+)", text)
            if found:
                what = f"it references {found.group(1)}"
            elif opcode:
                what = f"it uses pickle instruction {opcode.group(1)}, which the safe loader does not accept"
            else:
                what = "it holds objects that are not plain weights"
            raise FileError(
                path,
                f"refused: {what}, and unpickling that could run code; only tensors and plain "
                "containers are read (re-save it as .safetensors with a tool you trust)",
            ) from None
        raise FileError(path, f"not a readable PyTorch checkpoint ({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt files; each is one message
        raise FileError(path, f"not a readable PyTorch checkpoint ({type(e).__name__}: {_first_line(e)})") from None


def _tensors_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The weights in a loaded pickle: the dict itself, or its ``state_dict`` entry (Lightning)."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise FileError(path, f"holds a {type(obj).__name__}, not a dictionary of weights")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise FileError(path, f"holds no tensors (top-level entries: {', '.join(_plain(str(k)) for k in list(obj)[:8])})")
    return tensors


def _read_train_checkpoint(path: Path, obj: Mapping[str, Any]) -> Checkpoint:
    """A ``vqcli train`` checkpoint: its EMA weights, which are what training saves as the model."""
    try:
        config = AutoEncoderConfig.from_dict(json.loads(obj["config"]))
        ema = obj["ema"]
        if not isinstance(ema, Mapping):
            raise TypeError(f"its ema entry is a {type(ema).__name__}, not a mapping of weights")
        state = dict(ema)
    except (KeyError, TypeError, ValueError, RecursionError, ConfigError) as e:
        raise FileError(path, f"damaged vqcli training checkpoint ({_first_line(e)[:200]})") from None
    return Checkpoint(path, "vqcli", config, state, factors_stated=True)


def _read_diffusers_folder(
    folder: Path, *, weights: Path | None = None, config_path: Path | None = None
) -> Checkpoint:
    if not (folder / "config.json").is_file():
        sub = next((folder / s for s in DIFFUSERS_SUBFOLDERS if (folder / s / "config.json").is_file()), None)
        if sub is None:
            raise FileError(folder, "a folder, but not a diffusers model (no config.json, nor vae/config.json)")
        folder = sub
    cfg_path = config_path or folder / "config.json"
    cfg = _read_json(cfg_path)
    cls = cfg.get("_class_name")
    if cls not in DIFFUSERS_CLASSES:
        what = _plain(cls) if isinstance(cls, str) and cls else "model of unknown class"
        raise FileError(cfg_path, f"describes a {what}; vqcli reads AutoencoderKL and VQModel")
    if weights is None:
        weights = next((folder / n for n in DIFFUSERS_WEIGHTS if (folder / n).is_file()), None)
        if weights is None:
            raise FileError(folder, "no diffusion_pytorch_model.safetensors or .bin in it (sharded weights are not supported)")
    if _is_safetensors(weights):
        header = read_safetensors_header(weights)
        state, ignored = _read_safetensors_selection(weights, [k for k in header if k != "__metadata__"])
    else:
        state, ignored = _select(_tensors_of(_safe_torch_load(weights), weights), weights)
    _layout_or_error(state, weights)
    state = _to_original(state, weights)
    config, stated = check_diffusers_config(cfg, infer_config(state, source=weights), cfg_path)
    if "_vqcli_config" not in cfg:  # else the name was restored exactly, empty or not
        name = folder.parent.name if folder.name in DIFFUSERS_SUBFOLDERS else folder.name
        config = config.replace(name=config.name or name)
    return Checkpoint(folder, DIFFUSERS, config, state, ignored=ignored, factors_stated=stated)


def _layout_or_error(state: Mapping[str, torch.Tensor], path: Path) -> str:
    layout = detect_layout(state)
    if layout is None:
        raise FileError(
            path,
            "not an autoencoder of the ldm / taming / diffusers family: no encoder/decoder weights in "
            f"either layout ({_key_summary(state)})",
        )
    return layout


def _to_original(state: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    try:
        return to_original(state)
    except ValueError as e:
        raise FileError(path, str(e)) from None


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    name = aliases.get(str(dtype).lower(), str(dtype).lower())
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r} (use {', '.join(DTYPES)})")
    return DTYPES[name]


def _dominant_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype holding most of the weights (float32 when there are none)."""
    counts: Counter[torch.dtype] = Counter()
    for t in state.values():
        if t.is_floating_point():
            counts[t.dtype] += t.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32


# --- writing -----------------------------------------------------------------------------------


def diffusers_config(config: AutoEncoderConfig) -> dict[str, Any]:
    """The diffusers ``config.json`` of an equivalent ``AutoencoderKL`` / ``VQModel``.

    Raises ``ConfigError`` for what diffusers cannot express (``resamp_with_conv=False``; a KL
    model whose ``embed_dim`` differs from ``z_channels``; a VQ model without both quant convs).
    The full vqcli config rides along as ``_vqcli_config`` (diffusers ignores ``_`` entries), so
    converting back restores it exactly.
    """
    problems = []
    if not config.resamp_with_conv:
        problems.append("resamp_with_conv=False (diffusers' encoder always downsamples with a conv)")
    if config.kind == "kl" and config.embed_dim != config.z_channels:
        problems.append("a KL model with embed_dim != z_channels")
    if config.kind == "vq" and not (config.use_quant_conv and config.use_post_quant_conv):
        problems.append("a VQ model without quant_conv and post_quant_conv")
    if problems:
        raise ConfigError("diffusers cannot express " + "; ".join(problems))
    n = len(config.ch_mult)
    levels = attention_levels(config)
    out: dict[str, Any] = {
        "_class_name": "AutoencoderKL" if config.kind == "kl" else "VQModel",
        "_diffusers_version": DIFFUSERS_VERSION_WRITTEN,
        "in_channels": config.in_channels,
        "out_channels": config.out_ch,
        "down_block_types": ["AttnDownEncoderBlock2D" if i in levels else "DownEncoderBlock2D" for i in range(n)],
        "up_block_types": ["AttnUpDecoderBlock2D" if n - 1 - k in levels else "UpDecoderBlock2D" for k in range(n)],
        "block_out_channels": [config.ch * m for m in config.ch_mult],
        "layers_per_block": config.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": config.z_channels,
        "norm_num_groups": 32,
        "sample_size": config.resolution,
        "scaling_factor": config.scale_factor,
        "mid_block_add_attention": config.mid_attention,
        "force_upcast": True,
    }
    if config.kind == "kl":
        out.update(
            shift_factor=config.shift_factor or None,
            latents_mean=None,
            latents_std=None,
            use_quant_conv=config.use_quant_conv,
            use_post_quant_conv=config.use_post_quant_conv,
        )
    else:
        out.update(
            num_vq_embeddings=config.n_embed, vq_embed_dim=config.embed_dim, norm_type="group", lookup_from_codebook=False
        )
    out["_vqcli_config"] = config.to_dict()
    return out


def save_diffusers(model: AutoEncoder, folder: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write ``model`` as a diffusers folder (config.json + diffusion_pytorch_model.safetensors).

    Built under a temporary name beside ``folder`` and renamed into place. Replacing an existing
    folder needs ``overwrite`` and is refused when the folder holds anything but such a model,
    so a pipeline folder is never deleted by mistake.
    """
    from safetensors.torch import save_file

    final = Path(folder)
    _check_replaceable(final, overwrite)
    try:
        config = diffusers_config(model.config)
    except ConfigError as e:
        raise FileError(final, str(e)) from None
    tensors = to_diffusers({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(final.parent)
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        save_file(tensors, str(tmp / DIFFUSERS_WEIGHTS[0]), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for name in (DIFFUSERS_WEIGHTS[0], "config.json"):
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
        _check_replaceable(final, overwrite)
        if final.exists():
            old = make_temp_dir(final.parent, old=True)
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        error = as_os_error(e, final) if isinstance(e, Exception) and not isinstance(e, OSError) else None
        if error is not None:  # safetensors' own error for a failed write (a full disk)
            raise error from e
        raise


def _check_replaceable(final: Path, overwrite: bool) -> None:
    if not (final.exists() or final.is_symlink()):
        return
    if not overwrite:
        raise FileError(final, "already exists (pass --overwrite to replace it)")
    if not final.is_dir() or final.is_symlink():
        raise FileError(final, "exists and is not a folder; not replacing it with a diffusers folder")
    others = [p.name for p in final.iterdir() if p.name != "config.json" and not p.name.startswith("diffusion_pytorch_model")]
    if others:
        raise FileError(final, f"holds other files ({', '.join(sorted(others)[:4])}); not replacing it")


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    to: str | None = None,
    preset: str | None = None,
    scale_factor: float | None = None,
    shift_factor: float | None = None,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
) -> tuple[AutoEncoder, str]:
    """Read any supported checkpoint and write it as vqcli's ``.safetensors`` or a diffusers folder.

    ``to`` is ``"vqcli"`` or ``"diffusers"``; by default a destination ending in ``.safetensors``
    gets vqcli's format and anything else a diffusers folder. Returns the model and the format written.
    """
    target = Path(dst)
    to = to or ("vqcli" if target.suffix.lower() == ".safetensors" else "diffusers")
    if to not in ("vqcli", "diffusers"):
        raise UsageError(f"unknown target format {to!r} (use vqcli or diffusers)")
    if to == "vqcli":
        if target.exists() and not overwrite:
            raise FileError(target, "already exists (pass --overwrite to replace it)")
        if target.is_dir():
            raise FileError(target, "is a folder; vqcli's format is one .safetensors file")
    else:
        _check_replaceable(target, overwrite)
    model = load_checkpoint(src, preset=preset, scale_factor=scale_factor, shift_factor=shift_factor, dtype=dtype)
    if to == "vqcli":
        try:
            model.save(target, overwrite=overwrite)
        except FileExistsError:
            raise FileError(target, "already exists (pass --overwrite to replace it)") from None
        except OSError as e:
            raise FileError(target, e.strerror or str(e)) from None
    else:
        save_diffusers(model, target, overwrite=overwrite)
    return model, to


__all__ = [
    "Checkpoint",
    "apply_conventions",
    "build_model",
    "check_diffusers_config",
    "check_yaml_config",
    "convert_checkpoint",
    "describe",
    "diffusers_config",
    "find_yaml_config",
    "infer_config",
    "load_checkpoint",
    "read_checkpoint",
    "save_diffusers",
]
