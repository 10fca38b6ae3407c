"""Reading safetensors files safely, and vqcli's native weights format."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import ConfigError, FileError


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, or a ``FileError`` saying why not.

    The header is validated before any tensor is touched: its length must fit in the file, it must
    be a JSON object, and every tensor's byte range must lie inside the data section with the size
    its dtype and shape imply (the safetensors library checks these too; we check first so that
    the message is ours).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    header = read_safetensors_header(path)
    metadata = header.pop("__metadata__", None) or {}
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise FileError(path, f"not a readable safetensors file ({_short(e)})") from None
    return tensors, dict(metadata)


def read_safetensors_header(path: Path) -> dict:
    """The parsed JSON header of a safetensors file, checked for consistency with the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FileError(path, f"not a safetensors file (only {size} bytes)")
            n = int.from_bytes(head, "little")
            if n < 2 or 8 + n > size:
                raise FileError(path, f"not a safetensors file (header of {n} bytes does not fit in {size} bytes)")
            if n > 100_000_000:
                raise FileError(path, f"safetensors header of {n} bytes is too large")
            raw = f.read(n)
    except OSError as e:
        raise FileError(path, e.strerror or str(e)) from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise FileError(path, "not a safetensors file (header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise FileError(path, "not a safetensors file (header is not a JSON object)")
    data_size = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not (
                isinstance(info, dict) and all(isinstance(v, str) for v in info.values())
            ):
                raise FileError(path, "safetensors metadata must map strings to strings")
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise FileError(path, f"tensor {name!r} lies outside the file (truncated or corrupt)")
    return header


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def read_native(path: Path) -> tuple["AutoEncoderConfig", dict[str, torch.Tensor]]:  # noqa: F821
    """Config and state dict of a native vqcli weights file."""
    from .autoencoder import FORMAT, FORMAT_VERSION, AutoEncoderConfig

    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != FORMAT:
        raise FileError(path, "not a vqcli weights file (no vqcli config in its metadata)")
    version = metadata.get("format_version", "?")
    if version != str(FORMAT_VERSION):
        raise FileError(path, f"vqcli weights format version {version} is not supported (this vqcli reads {FORMAT_VERSION})")
    try:
        config = AutoEncoderConfig.from_dict(json.loads(metadata["config"]))
    except (KeyError, json.JSONDecodeError, ConfigError, TypeError) as e:
        raise FileError(path, f"bad model config in metadata: {e}") from None
    return config, tensors
