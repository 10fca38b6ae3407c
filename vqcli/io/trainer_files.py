"""Latent files in the layouts training tools read: kohya-ss sd-scripts' ``.npz`` latent cache and
ComfyUI's ``.latent``; and reading any of the three layouts back (``decode``, ``stats``).

kohya (``--layout kohya``): ``a.png`` -> ``a.npz`` (sd-scripts' cache is the image's name with
``.npz`` for its extension, found next to the image), arrays ``latents`` (C, h, w),
``original_size`` (width, height of the image before resizing), ``crop_ltrb`` (left, top, right,
bottom of the crop in the resized image), ``latents_flipped`` with ``--flip``; the same again with
the suffix ``_{h}x{w}`` (the latent's height and width) that its newer caching strategies read
(``latents_32x48``). vqcli's own metadata rides along as the string array ``vqcli_meta`` (JSON);
numpy reads it without unpickling anything.

ComfyUI (``--layout comfyui``): ``a.png`` -> ``a.png.latent``, a safetensors file with
``latent_tensor`` (1, C, h, w) float32 and the empty marker ``latent_format_version_0`` (without
it LoadLatent divides by SD1's 0.18215); ComfyUI expects the model's raw latent (it scales them
itself), so these are never ``--scaled``. vqcli's metadata is the safetensors metadata.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from vqcli.errors import FileError
from vqcli.io import latents as lat
from vqcli.io.images import check_pixels
from vqcli.io.safetensors import read_safetensors, read_safetensors_header

LAYOUTS = ("vqcli", "kohya", "comfyui")
KOHYA_SUFFIX = ".npz"
COMFY_SUFFIX = ".latent"
META_KEY = "vqcli_meta"
COMFY_KEY = "latent_tensor"
COMFY_MARKER = "latent_format_version_0"


def output_name(layout: str, image_name: str) -> str:
    """The file an image's latent goes to in ``layout``."""
    if layout == "kohya":
        return os.path.splitext(image_name)[0] + KOHYA_SUFFIX
    if layout == "comfyui":
        return image_name + COMFY_SUFFIX
    return image_name + lat.SUFFIX


def is_any_latent_path(path: str | os.PathLike) -> bool:
    name = Path(path).name.lower()
    return name.endswith((lat.SUFFIX, KOHYA_SUFFIX, COMFY_SUFFIX))


def _kohya_arrays(tensor: torch.Tensor, meta: lat.LatentMeta, extras: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    h, w = meta.latent_shape[-2:]
    top, left = meta.crop_top_left
    oh, ow = meta.original_size or (meta.height, meta.width)
    fields = {
        "latents": _numpy(lat.to_storage(tensor, meta)),
        "original_size": np.array([ow, oh]),
        "crop_ltrb": np.array([left, top, left + meta.width, top + meta.height]),
    }
    if "latent_flipped" in extras:
        fields["latents_flipped"] = _numpy(lat.to_storage(extras["latent_flipped"], meta))
    arrays = dict(fields)
    arrays.update({f"{k}_{h}x{w}": v for k, v in fields.items()})
    for name, extra in extras.items():
        if name != "latent_flipped":  # the log-variances: vqcli's names (sd-scripts does not read them)
            arrays[name] = _numpy(lat.to_storage(extra, meta))
    arrays[META_KEY] = np.array(json.dumps(meta.to_metadata(), sort_keys=True))
    return arrays


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.numpy()


def layout_bytes(layout: str, tensor: torch.Tensor, meta: lat.LatentMeta, extras: dict[str, torch.Tensor]) -> bytes:
    """A latent file's bytes in ``layout``."""
    if layout == "kohya":
        buffer = io.BytesIO()
        np.savez(buffer, **_kohya_arrays(tensor, meta, extras))
        return buffer.getvalue()
    from safetensors.torch import save

    tensors = lat.stored_tensors(tensor, meta, extras)
    if layout == "comfyui":
        tensors[COMFY_KEY] = tensors.pop(lat.KEY).unsqueeze(0).contiguous()
        tensors[COMFY_MARKER] = torch.tensor([])
    return save(tensors, metadata=meta.to_metadata())


def _kohya_meta(path: Path) -> tuple[np.lib.npyio.NpzFile, dict]:
    try:
        npz = np.load(path, allow_pickle=False)
        if META_KEY not in npz.files:
            raise FileError(path, f"an .npz without vqcli's metadata ({META_KEY}): not written by vqcli")
        meta = json.loads(str(npz[META_KEY]))
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise FileError(path, f"its {META_KEY} is not a JSON object of strings")
        return npz, meta
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise FileError(path, f"not a readable .npz file ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None


def read_metadata(path: str | os.PathLike) -> dict:
    """vqcli's metadata of a latent file in any layout, reading as little as the layout allows."""
    path = Path(path)
    if path.name.lower().endswith(KOHYA_SUFFIX):
        return _kohya_meta(path)[1]
    return read_safetensors_header(path).get("__metadata__") or {}


def is_ours(path: str | os.PathLike) -> bool:
    """True when ``path`` is a latent file vqcli wrote, in any layout."""
    try:
        return read_metadata(path).get("format") == lat.FORMAT
    except (FileError, OSError):
        return False


def read_provenance(path: str | os.PathLike) -> tuple[str | None, str | None]:
    """``(input_stamp, recipe)`` of a latent file in any layout (resume)."""
    meta = read_metadata(path)
    stamp, recipe = meta.get("input_stamp"), meta.get("recipe")
    return (stamp if isinstance(stamp, str) else None), (recipe if isinstance(recipe, str) else None)


def read_any(path: str | os.PathLike, *, max_pixels: int | None = None) -> lat.Latent:
    """A latent file in any of the three layouts, validated as ``latents.read_latent`` does."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(KOHYA_SUFFIX):
        npz, metadata = _kohya_meta(path)
        meta = lat.parse_meta(path, metadata)
        check_pixels(path, meta.padded_width, meta.padded_height, max_pixels, what="the decoded image")
        with npz:
            if "latents" not in npz.files:
                raise FileError(path, "has no 'latents' array")
            tensor = torch.from_numpy(np.array(npz["latents"]))
            extras = {}
            if "latents_flipped" in npz.files:
                extras["latent_flipped"] = torch.from_numpy(np.array(npz["latents_flipped"]))
        for t in (tensor, *extras.values()):
            lat.check_tensor(path, t, meta)
        return lat.Latent(tensor, meta, extras)
    if name.endswith(COMFY_SUFFIX):
        meta = lat.parse_meta(path, read_safetensors_header(path).get("__metadata__") or {})
        check_pixels(path, meta.padded_width, meta.padded_height, max_pixels, what="the decoded image")
        tensors, _ = read_safetensors(path)
        if COMFY_KEY not in tensors or tensors[COMFY_KEY].dim() != len(meta.latent_shape) + 1:
            raise FileError(path, f"has no {COMFY_KEY!r} tensor of shape (1, {', '.join(map(str, meta.latent_shape))})")
        tensor = tensors.pop(COMFY_KEY)[0]
        tensors.pop(COMFY_MARKER, None)
        extras = {k: v for k, v in tensors.items() if k in lat.EXTRA_KEYS}
        for t in (tensor, *extras.values()):
            lat.check_tensor(path, t, meta)
        return lat.Latent(tensor, meta, extras)
    return lat.read_latent(path, max_pixels=max_pixels)
