"""Every layer's feature map for one image, their statistics, and pictures of them.

``extract_features`` runs the image through the model once (``AutoEncoder.encode`` then
``decode``, so that ``quant_conv``, the regulariser and ``post_quant_conv`` are applied exactly as
in encoding and decoding) while the encoder and the decoder record their maps with
``forward_with_features_output``. Keys are ``encoder.<name>`` and ``decoder.<name>`` with the names
of the model API (``encoder.conv_in``, ``encoder.down0_block0``, ``decoder.up1_block0``, ...).

Pictures: ``layer_grid`` shows a layer's most active channels (largest mean absolute activation),
each min-max normalised on its own, labelled with the channel number; ``overview`` shows every
layer side by side as the mean absolute activation over its channels.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from vqcli.io.atomic import atomic_path
from vqcli.io.images import vqcli_exif
from vqcli.io.latents import pad_factor
from vqcli.io.padding import pad_to_multiple, to_model_input
from vqcli.io.safetensors import write_safetensors
from vqcli.model.autoencoder import AutoEncoder
from vqcli.speed.context import compute_context, compute_model, memory_format_for


@contextlib.contextmanager
def _recording(coder: torch.nn.Module, store: dict, prefix: str) -> Iterator[None]:
    """While inside, ``coder(x)`` also puts its feature maps into ``store`` (as ``prefix.name``)."""

    def forward(x):
        out, features = type(coder).forward_with_features_output(coder, x)
        for name, t in features.items():
            store[f"{prefix}.{name}"] = t[0].detach().float().cpu()
        return out

    coder.forward = forward  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        del coder.forward


def extract_features(
    model: AutoEncoder, rgb: np.ndarray, *, dtype: torch.dtype = torch.float32
) -> "OrderedDict[str, torch.Tensor]":
    """All feature maps ``(C, H, W)`` (float32, on the CPU) of one (H, W, 3) [0, 1] image, in order."""
    height, width = rgb.shape[:2]
    x = pad_to_multiple(to_model_input(rgb), pad_factor(height, width, model.config.downsampling))
    device = next(model.parameters()).device
    runner = compute_model(model, device, dtype)  # (as encode and decode run it)
    x = x.to(device).contiguous(memory_format=memory_format_for(dtype, device))
    store: OrderedDict[str, torch.Tensor] = OrderedDict()
    with compute_context(device, dtype):
        with _recording(runner.encoder, store, "encoder"):
            z = runner.encode(x)
        with _recording(runner.decoder, store, "decoder"):
            runner.decode(z)
    return store


def select_layers(features: "OrderedDict[str, torch.Tensor]", patterns: Sequence[str]) -> "OrderedDict[str, torch.Tensor]":
    """Layers whose full key (``encoder.down0_block0``) or bare name (``down0_block0``) matches a glob."""
    if not patterns:
        return features
    return OrderedDict(
        (key, t)
        for key, t in features.items()
        if any(fnmatch.fnmatchcase(key, p) or fnmatch.fnmatchcase(key.split(".", 1)[-1], p) for p in patterns)
    )


def layer_stats(t: torch.Tensor) -> dict:
    t = t.float()
    return {
        "shape": list(t.shape),
        "mean": float(t.mean()),
        "std": float(t.std(unbiased=False)),
        "min": float(t.min()),
        "max": float(t.max()),
    }


def save_features(
    path: str | os.PathLike,
    features: "OrderedDict[str, torch.Tensor]",
    *,
    dtype: torch.dtype = torch.float32,
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
) -> None:
    """All maps in one safetensors file (keys as in ``features``), atomically."""
    tensors = {k: v.to(dtype).contiguous() for k, v in features.items()}
    with atomic_path(path, overwrite=overwrite) as tmp, open(tmp, "wb") as f:
        write_safetensors(f, tensors, {"format": "vqcli.features", **(metadata or {})})


def most_active_channels(t: torch.Tensor, k: int) -> list[int]:
    """The ``k`` channels of a (C, H, W) map with the largest mean absolute activation, strongest first."""
    activity = t.float().abs().mean(dim=(1, 2))
    return activity.argsort(descending=True)[: min(k, t.shape[0])].tolist()


def _normalise(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _tile(a: np.ndarray, size: int) -> Image.Image:
    """A 2D map as a greyscale tile whose longer side is ``size`` (nearest when enlarging)."""
    img = Image.fromarray(np.clip(np.rint(_normalise(a) * 255), 0, 255).astype(np.uint8))
    h, w = a.shape
    scale = size / max(h, w)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(new, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BOX)


def _grid(tiles: list[tuple[str, Image.Image]], title: str, columns: int) -> Image.Image:
    label_h, pad, title_h = 14, 4, 20
    columns = min(columns, max(1, len(tiles)))
    rows = max(1, -(-len(tiles) // columns))
    cell_w = max((t.width for _, t in tiles), default=1) + pad
    cell_h = max((t.height for _, t in tiles), default=1) + label_h + pad
    canvas = Image.new("RGB", (pad + columns * cell_w, title_h + pad + rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text((pad, 4), title, fill="black", font=font)
    for i, (label, tile) in enumerate(tiles):
        r, c = divmod(i, columns)
        x0, y0 = pad + c * cell_w, title_h + pad + r * cell_h
        draw.text((x0, y0), label, fill="black", font=font)
        canvas.paste(tile.convert("RGB"), (x0, y0 + label_h))
    return canvas


def layer_grid(name: str, t: torch.Tensor, *, channels: int = 16, tile: int = 96) -> Image.Image:
    """A labelled grid of the layer's most active channels."""
    picked = most_active_channels(t, channels)
    tiles = [(f"ch {c}", _tile(t[c].float().numpy(), tile)) for c in picked]
    title = f"{name}  {tuple(t.shape)}  top {len(picked)} channels by mean |activation|"
    return _grid(tiles, title, columns=8)


def overview(features: "OrderedDict[str, torch.Tensor]", *, tile: int = 128, columns: int = 8) -> Image.Image:
    """Every layer side by side, in execution order: mean |activation| over its channels."""
    tiles = [
        (key.replace("encoder.", "enc ").replace("decoder.", "dec "), _tile(t.float().abs().mean(0).numpy(), tile))
        for key, t in features.items()
    ]
    return _grid(tiles, "all layers: mean |activation| over channels", columns=columns)


def save_png(image: Image.Image, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """A PNG marked as vqcli's (so that ``--overwrite`` may replace it later), atomically."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        image.save(tmp, format="PNG", exif=vqcli_exif())
