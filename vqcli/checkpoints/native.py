"""vqcli's native weights file: safetensors with the architecture in its metadata."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from vqcli.errors import ConfigError, FileError
from vqcli.io.atomic import atomic_path
from vqcli.io.safetensors import _short, read_safetensors, short_name, write_safetensors
from vqcli.model.autoencoder import AutoEncoder, load_strict
from vqcli.model.config import AutoEncoderConfig

FORMAT = "vqcli.weights"
FORMAT_VERSION = 1


def save_native(model: AutoEncoder, path: str | os.PathLike, *, overwrite: bool = True) -> None:
    """Write the native weights file atomically: safetensors with the config in its metadata."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(model.config.to_dict(), sort_keys=True),
    }
    with atomic_path(path, overwrite=overwrite) as tmp, open(tmp, "wb") as f:
        write_safetensors(f, tensors, metadata)


def load_native(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> AutoEncoder:
    """Load a native weights file written by ``save_native``, in eval mode (like the checkpoint readers)."""
    config, state = read_native(Path(path))
    model = AutoEncoder(config)
    load_strict(model, state, path)
    return model.to(device).eval()


def read_native(path: Path) -> tuple[AutoEncoderConfig, dict[str, torch.Tensor]]:
    """Config and state dict of a native vqcli weights file."""
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != FORMAT:
        raise FileError(path, "not a vqcli weights file (no vqcli config in its metadata)")
    version = metadata.get("format_version", "?")
    if version != str(FORMAT_VERSION):
        raise FileError(path, f"vqcli weights format version {version} is not supported (this vqcli reads {FORMAT_VERSION})")
    if "config" not in metadata:
        raise FileError(path, "bad model config in metadata: it has none")
    try:
        config = AutoEncoderConfig.from_dict(json.loads(metadata["config"]))
    except (ValueError, RecursionError, ConfigError, TypeError) as e:
        raise FileError(path, f"bad model config in metadata: {_short(e)[:200]}") from None
    check_weights(config, tensors, path)
    return config, tensors


def check_weights(config: AutoEncoderConfig, state: dict[str, torch.Tensor], source) -> None:
    """Refuse weights that cannot be those of ``AutoEncoder(config)``, before any model is allocated.

    Names, shapes, dtypes and values are checked against a model built on the meta device (which
    allocates nothing, whatever sizes a hostile config asks for): the same keys and shapes
    (``load_strict``'s message), floating-point tensors only, and no NaN or infinite value.
    """
    odd = [k for k in state if not (isinstance(k, str) and k.isprintable() and len(k) <= 1000)]
    if odd:
        raise FileError(source, f"weights have a tensor name no model has: {short_name(str(odd[0]))}")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise FileError(source, f"weights entry {short_name(not_tensors[0])} is not a tensor")
    # Every level has at least one res block of several tensors: a config needing more levels and
    # blocks than the file has tensors cannot match it (and would be slow to build even on meta).
    if len(config.ch_mult) * config.num_res_blocks > len(state):
        raise FileError(
            source,
            f"its config ({len(config.ch_mult)} levels x {config.num_res_blocks} res blocks) needs more "
            f"tensors than the {len(state)} the file holds",
        )
    with torch.device("meta"):
        reference = AutoEncoder(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # copying into meta tensors does nothing, which is all we want
        load_strict(reference, state, source)
    not_float = sorted(k for k, v in state.items() if not v.is_floating_point())
    if not_float:
        first = not_float[0]
        raise FileError(
            source,
            f"{len(not_float)} weight tensor(s) are not floating point, e.g. {first} "
            f"({str(state[first].dtype).removeprefix('torch.')})",
        )
    for name in sorted(state):
        tensor = state[name]
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise FileError(source, f"weights hold {bad} NaN or infinite value(s) in {name}")
