"""The config files that come with checkpoints (diffusers ``config.json``, ldm YAML), checked against the weights."""

from __future__ import annotations

import json
import logging
import math
import os
import reprlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vqcli.checkpoints.infer import _plain
from vqcli.checkpoints.registry import preset_with_factors
from vqcli.errors import ConfigError, FileError, first_line
from vqcli.model.config import (
    AutoEncoderConfig,
    architecture_key,
    attention_levels,
    describe,
)

# The files of a diffusers autoencoder folder (weights in order of preference), the subfolders of a
# pipeline that hold one, and its classes.
DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
)
DIFFUSERS_SUBFOLDERS = ("vae", "vqvae")
DIFFUSERS_CLASSES = {"AutoencoderKL": "kl", "VQModel": "vq"}

log = logging.getLogger(__name__)


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
    if not isinstance(cls, str) or cls not in DIFFUSERS_CLASSES:
        what = _plain(cls) if isinstance(cls, str) and cls else "model of unknown class"
        raise FileError(source, f"describes a {what}; vqcli reads AutoencoderKL and VQModel")
    try:
        return _check_diffusers_config(cfg, cls, inferred, source)
    except (TypeError, ValueError, ArithmeticError, AttributeError) as e:  # a value of the wrong type or size
        raise FileError(source, f"unreadable config.json ({first_line(e)[:200]})") from None


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
        raise FileError(path, f"unreadable ddconfig ({first_line(e)[:200]})") from None
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
        raise FileError(path, f"not valid JSON ({first_line(e)[:200]})") from None
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
        raise FileError(path, f"not valid YAML ({first_line(e)[:200]})") from None
