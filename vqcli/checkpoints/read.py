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
import os
import pickle
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vqcli.checkpoints.configs import (
    DIFFUSERS_CLASSES,
    DIFFUSERS_SUBFOLDERS,
    DIFFUSERS_WEIGHTS,
    _read_json,
    check_diffusers_config,
    check_yaml_config,
    find_yaml_config,
)
from vqcli.checkpoints.infer import _key_summary, _plain, infer_config
from vqcli.checkpoints.layouts import (
    DIFFUSERS,
    detect_layout,
    select_autoencoder,
    to_original,
)
from vqcli.checkpoints.native import FORMAT as NATIVE_FORMAT
from vqcli.checkpoints.native import check_weights, read_native
from vqcli.checkpoints.registry import EMBEDDED, get_preset, guess_preset
from vqcli.errors import ConfigError, FileError, UsageError, first_line
from vqcli.io.safetensors import read_safetensors_header
from vqcli.model.autoencoder import AutoEncoder, load_strict
from vqcli.model.config import AutoEncoderConfig, describe
from vqcli.speed.devices import DTYPES

log = logging.getLogger(__name__)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")








TRAIN_CHECKPOINT_FORMAT = "vqcli.train-checkpoint"  # what vqcli.train writes (resumable)


@dataclass
class Checkpoint:
    """A checkpoint read and understood, before a model is built from it."""

    path: Path  # the file (or folder) the weights came from
    format: str  # "vqcli", "original" or "diffusers"
    config: AutoEncoderConfig  # architecture, plus the latent factors when the file states them
    state: dict[str, torch.Tensor]  # the autoencoder's weights in the original (vqcli) layout
    ignored: int = 0  # keys of the file that are not the autoencoder's (see module docstring)
    factors_stated: bool = False  # scale and shift came from the file's own config


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
        raise FileError(path, f"not a readable safetensors file ({first_line(e)})") from None
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
        raise FileError(path, f"not a readable PyTorch checkpoint ({first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt files; each is one message
        raise FileError(path, f"not a readable PyTorch checkpoint ({type(e).__name__}: {first_line(e)})") from None


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
        raise FileError(path, f"damaged vqcli training checkpoint ({first_line(e)[:200]})") from None
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
    if not isinstance(cls, str) or cls not in DIFFUSERS_CLASSES:
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
