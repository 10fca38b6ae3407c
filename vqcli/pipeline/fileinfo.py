"""What a file is: a latent file, a weights file, a features file or another safetensors file.

``describe(path)`` returns a JSON-friendly dict (``type`` says which) or raises ``FileError``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from vqcli.checkpoints.load import load_model_file
from vqcli.checkpoints.native import read_native
from vqcli.checkpoints.read import read_checkpoint
from vqcli.errors import FileError, VqcliError
from vqcli.io.latents import latent_stats
from vqcli.io.safetensors import read_safetensors_header
from vqcli.io.trainer_files import COMFY_SUFFIX, KOHYA_SUFFIX, is_ours, read_any
from vqcli.model.autoencoder import AutoEncoder, load_strict

MAX_LISTED = 64  # tensors listed one by one; past that, a summary


def describe(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileError(path, "no such file")
    if path.suffix.lower() in (KOHYA_SUFFIX, COMFY_SUFFIX) and path.is_file():
        if not is_ours(path):
            raise FileError(path, "not a latent file vqcli wrote (no vqcli metadata in it)")
        return _latent(path)
    if path.is_dir() or path.suffix.lower() != ".safetensors":
        return _checkpoint(path, None)
    header = read_safetensors_header(path)
    metadata = header.get("__metadata__") or {}
    fmt = metadata.get("format")
    if fmt == "vqcli.latent":
        return _latent(path)
    if fmt == "vqcli.weights":
        return _weights(path)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if fmt == "vqcli.features":
        return {"file": str(path), "type": "features", "metadata": metadata, **_tensor_listing(tensors)}
    try:
        return _checkpoint(path, tensors)
    except FileError as e:
        return {
            "file": str(path),
            "type": "safetensors",
            "note": f"not a model vqcli can read ({e.reason})",
            "metadata": metadata,
            **_tensor_listing(tensors),
        }


def _latent(path: Path) -> dict:
    latent = read_any(path)
    return {
        "file": str(path),
        "type": "latent",
        **latent.meta.to_json(),
        "tensor": {"name": "latent", "shape": list(latent.tensor.shape), "dtype": latent.meta.dtype},
        "extra_tensors": sorted(latent.extras),
        "stats": latent_stats(latent),
    }


def _weights(path: Path) -> dict:
    config, state = read_native(path)
    load_strict(AutoEncoder(config), state, path)  # refused here if the weights do not fit their config
    return _model_info(path, "weights", load_model_file(path), _dtypes(state))


def _dtypes(state: dict) -> dict[str, int]:
    return dict(Counter(str(t.dtype).removeprefix("torch.") for t in state.values()))


def _model_info(path: Path, kind: str, model, stored_dtypes: dict[str, int] | None = None) -> dict:
    """``stored_dtypes``: the dtypes in the file (the model itself holds float32 weights)."""
    state = model.state_dict()
    c = model.config
    return {
        "file": str(path),
        "type": kind,
        "model": {"name": c.name, "sha256": model.identity(), "kind": c.kind},
        "config": c.to_dict(),
        "downsampling": c.downsampling,
        "latent_channels": c.latent_channels,
        "parameters": int(sum(t.numel() for t in state.values())),
        "dtypes": stored_dtypes if stored_dtypes is not None else _dtypes(state),
        "tensors": len(state),
    }


def _checkpoint(path: Path, tensors: dict | None) -> dict:
    """A foreign checkpoint: its model, format and the keys that are not the autoencoder's."""
    try:
        model = load_model_file(path)
        ckpt = read_checkpoint(path)
    except VqcliError as e:
        raise FileError(path, str(e.reason if isinstance(e, FileError) else e)) from None
    info = _model_info(path, "checkpoint", model, _dtypes(ckpt.state))
    info["format"] = ckpt.format
    info["ignored_keys"] = ckpt.ignored
    return info


def _tensor_listing(header_tensors: dict) -> dict:
    dtypes = Counter(str(v.get("dtype")) for v in header_tensors.values() if isinstance(v, dict))
    listing = {
        name: {"shape": v.get("shape"), "dtype": v.get("dtype")}
        for name, v in list(header_tensors.items())[:MAX_LISTED]
        if isinstance(v, dict)
    }
    return {
        "tensors": len(header_tensors),
        "dtypes": dict(dtypes),
        "tensor_list": listing,
        "tensor_list_truncated": len(header_tensors) > MAX_LISTED,
    }
