"""Reading and writing safetensors files safely: header checks before any tensor is read."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import torch

from vqcli.errors import FileError

# Bytes per element of the safetensors dtypes torch can hold (others are left to the library).
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
    "C64": 8,
}


# The largest header read, by kind of file, checked before it is read or parsed: a latent holds one
# tensor and a few metadata strings (a few KB); weights hold hundreds to a few thousand tensors
# (SDXL's VAE: 30 KB; a full checkpoint with metadata: a few MB).
LATENT_HEADER = 1024 * 1024
MAX_HEADER = 64 * 1024 * 1024
# JSON containers ('[' or '{') per header byte: a tensor's entry has three in 50 bytes or more; a
# header of empty lists ("[[],[],...]", one per 3 bytes) would cost 20 times its size once parsed
MAX_CONTAINERS_PER_BYTE = 1 / 8
_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # JSON strings, escapes included


def read_safetensors(path: Path, max_header: int = MAX_HEADER) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, or a ``FileError`` saying why not.

    The header is validated before any tensor is touched: its length must fit in the file, it must
    be a JSON object, and every tensor's byte range must lie inside the data section with the size
    its dtype and shape imply (the safetensors library checks these too; we check first so that
    the message is ours).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load, load_file

    header = read_safetensors_header(path, max_header)
    metadata = header.pop("__metadata__", None) or {}
    try:
        # safetensors opens only paths that are UTF-8; a file named otherwise is read by Python
        tensors = load_file(str(path)) if _utf8_path(path) else load(path.read_bytes())
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise FileError(path, f"not a readable safetensors file ({_short(e)})") from None
    return tensors, dict(metadata)


def _utf8_path(path: Path) -> bool:
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def read_safetensors_header(path: Path, max_header: int = MAX_HEADER) -> dict:
    """The parsed JSON header of a safetensors file, checked for consistency with the file size.

    A header over ``max_header`` bytes (``LATENT_HEADER`` for a latent), or one made mostly of
    brackets, is refused before it is read or parsed: parsing costs many times a header's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FileError(path, f"not a safetensors file (only {size} bytes)")
            n = int.from_bytes(head, "little")
            if n < 2 or 8 + n > size:
                raise FileError(path, f"not a safetensors file (header of {n} bytes does not fit in {size} bytes)")
            if n > max_header:
                raise FileError(path, f"safetensors header of {n:,} bytes is too large (over {max_header:,})")
            raw = f.read(n)
    except OSError as e:
        raise FileError(path, e.strerror or str(e)) from None
    bare = _STRINGS.sub(b'""', raw)  # brackets inside strings (a config's JSON) build nothing
    if bare.count(b"[") + bare.count(b"{") > 16 + n * MAX_CONTAINERS_PER_BYTE:
        raise FileError(path, "not a safetensors file (header is a heap of brackets, not tensor entries)")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        # ValueError: JSONDecodeError, and integers of more digits than Python converts;
        # RecursionError: brackets nested deeper than the parser's recursion limit
        raise FileError(path, "not a safetensors file (header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise FileError(path, "not a safetensors file (header is not a JSON object)")
    _check_entries(path, header, size - 8 - n)
    return header


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_entries(path: Path, header: dict, data_size: int) -> None:
    """Each tensor's entry: a known shape and dtype whose size is its byte range, inside the data
    section, no two ranges overlapping. Checked from the header alone, before anything is allocated."""
    ranges = []
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not (
                isinstance(info, dict) and all(isinstance(v, str) for v in info.values())
            ):
                raise FileError(path, "safetensors metadata must map strings to strings")
            continue
        label = short_name(name)
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_count(o) for o in offsets)
            or not offsets[0] <= offsets[1] <= data_size
        ):
            raise FileError(path, f"tensor {label} lies outside the file (truncated or corrupt)")
        shape, dtype = info.get("shape"), info.get("dtype")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape) or len(shape) > 64:
            raise FileError(path, f"tensor {label} has no valid shape (a list of sizes) in the header")
        if not isinstance(dtype, str):
            raise FileError(path, f"tensor {label} has no valid dtype in the header")
        itemsize = DTYPE_SIZES.get(dtype)
        if itemsize is not None:
            needed = itemsize
            for d in shape:
                needed *= d
            held = offsets[1] - offsets[0]
            if needed != held:
                raise FileError(
                    path,
                    f"not a readable safetensors file (tensor {label} claims shape {_short_list(shape)} of "
                    f"{dtype}, {_bytes(needed)} bytes, but its byte range holds {held:,})",
                )
        ranges.append((offsets[0], offsets[1], label))
    ranges.sort()
    for (_, end, first), (start, _, second) in zip(ranges, ranges[1:]):
        if start < end:
            raise FileError(path, f"not a readable safetensors file (tensors {first} and {second} overlap)")


# torch dtypes as safetensors names them (what vqcli writes)
_WRITE_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(f: BinaryIO, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (and string ``metadata``) to ``f`` as a safetensors file, the same bytes for
    the same contents: header keys sorted, tensors stored in name order. (The library's own writer
    orders the metadata by a hash seeded anew in every process, so equal files differed.)"""
    if sys.byteorder != "little":
        raise NotImplementedError("safetensors files are little-endian; writing them on a big-endian machine is not supported")
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    stored, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _WRITE_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        stored.append(t)
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as the library writes it
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for t in stored:
        if t.numel():
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def short_name(name: str, limit: int = 80) -> str:
    """A name from a file, fit for a one-line message: quoted, control characters escaped, cut short."""
    text = repr(name)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _bytes(n: int) -> str:
    return f"{n:,}" if n < 10**18 else f"{float(n):.3g}"


def _short_list(values: list) -> str:
    return str(values) if len(values) <= 8 else f"[{', '.join(map(str, values[:8]))}, ...]"


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
