"""The Python API for notebooks and scripts: a model, images in and out, latent files.

    import vqcli
    model = vqcli.load("default")              # an embedded name or a weights file
    latent = model.encode_image("photo.jpg")   # a path, a PIL image or a numpy array
    vqcli.write_latent("photo.safetensors", latent)
    image = model.decode_latent(vqcli.read_latent("photo.safetensors"))   # a PIL image

The numbers are those of ``vqcli encode`` and ``vqcli decode``, bit for bit: the same image
reading, padding, model and precision. Nothing is printed; failures are ``vqcli.VqcliError``
(``FileError`` for an input, ``UsageError`` for an argument) with the CLI's one-line messages.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

from vqcli.checkpoints.load import model_ref, resolve_model, with_factors
from vqcli.errors import UsageError
from vqcli.io import latents as lat
from vqcli.io.images import DEFAULT_MAX_PIXELS, load_image, pil_to_rgb, to_uint8
from vqcli.io.latents import Latent
from vqcli.model.autoencoder import AutoEncoder
from vqcli.pipeline.decode import decode_array
from vqcli.pipeline.encode import encode_array
from vqcli.speed.devices import resolve_device, resolve_dtype

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]


class Model:
    """A loaded autoencoder with image-level calls. ``autoencoder`` is the ``torch.nn.Module``."""

    def __init__(self, autoencoder: AutoEncoder, name: str, embedded: bool, device: torch.device, dtype: torch.dtype):
        self.autoencoder, self.name, self.embedded = autoencoder, name, embedded
        self.device, self.dtype = device, dtype

    def __repr__(self) -> str:
        c = self.autoencoder.config
        return f"<vqcli.Model {self.name!r} {c.kind} f{c.downsampling} on {self.device} ({self.dtype})>"

    def encode_image(self, image: ImageLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Latent:
        """The latent of one image, with the metadata a latent file carries (``latent.meta``).

        ``image``: a file path (read as ``vqcli encode`` reads it), a PIL image, or a numpy array
        (H, W, 3) or (H, W): uint8, or float in [0, 1].
        """
        details: dict = {}
        rgb, source = _rgb(image, max_pixels, details)
        height, width = rgb.shape[:2]
        tensor = encode_array(self.autoencoder, rgb, dtype=self.dtype)
        kind = self.autoencoder.config.kind
        meta = lat.make_meta(
            self.autoencoder,
            source=source,
            width=width,
            height=height,
            model_name=self.name,
            model_embedded=self.embedded,
            representation="indices" if kind == "vq" else "mean",
            icc_profile=details.get("icc_profile"),
        )
        return Latent(lat.to_storage(tensor, meta), meta)

    def decode_latent(self, latent: Latent) -> Image.Image:
        """The RGB image of ``latent``, at the original image's size.

        Raises ``FileError`` when another model made it (the weights' hash differs)."""
        meta = latent.meta
        lat.check_model(Path(meta.source or "latent"), meta, self.autoencoder, f"the model {self.name!r}")
        model = with_factors(self.autoencoder, meta.scale_factor, meta.shift_factor) if meta.scaled else self.autoencoder
        rgb = decode_array(model, latent.tensor, meta.height, meta.width, dtype=self.dtype, scaled=meta.scaled)
        return Image.fromarray(to_uint8(rgb))


def load(spec: str = "default", *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32") -> Model:
    """The model ``spec`` names: an embedded model ("default", "default-vq"), or a weights file or
    folder of any format ``vqcli --model`` takes. ``device``: "cpu", "cuda", "cuda:N", "mps" or
    "auto"; ``dtype``: "float32", "bfloat16" or "float16" (the compute precision)."""
    torch_device = resolve_device(str(device))
    if isinstance(dtype, torch.dtype):
        torch_dtype = dtype
    else:
        torch_dtype = resolve_dtype(str(dtype), torch_device)
        if torch_dtype is None:
            raise UsageError("dtype 'auto' is for the command line; pass float32, bfloat16 or float16")
    ref = model_ref(str(spec))
    autoencoder = resolve_model(str(spec), device=torch_device, dtype=torch_dtype)
    return Model(autoencoder, ref.name, ref.embedded, torch_device, torch_dtype)


def read_latent(path: str | os.PathLike) -> Latent:
    """A latent file, checked (``FileError`` naming the file and what is wrong)."""
    return lat.read_latent(path)


def write_latent(path: str | os.PathLike, latent: Latent, *, overwrite: bool = False) -> None:
    """Write ``latent`` as a latent file, atomically (``FileExistsError`` if the file exists and
    not ``overwrite``)."""
    lat.write_latent(path, latent.tensor, latent.meta, overwrite=overwrite)


def _rgb(image: ImageLike, max_pixels: int | None, details: dict) -> tuple[np.ndarray, str]:
    """(H, W, 3) float32 in [0, 1], and the name to record as the latent's source."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        return load_image(path, max_pixels=max_pixels, details=details), path.name
    if isinstance(image, Image.Image):
        return pil_to_rgb(image, details), getattr(image, "filename", "") and Path(image.filename).name or ""
    if isinstance(image, np.ndarray):
        return _array_rgb(image), ""
    raise UsageError(f"an image is a path, a PIL image or a numpy array, not {type(image).__name__}")


def _array_rgb(a: np.ndarray) -> np.ndarray:
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3) or a.shape[0] < 1 or a.shape[1] < 1:
        raise UsageError(f"an image array is (H, W, 3) or (H, W), not {tuple(a.shape)}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if not np.issubdtype(a.dtype, np.floating):
        raise UsageError(f"an image array is uint8, or float in [0, 1], not {a.dtype}")
    if not np.isfinite(a).all():
        raise UsageError("the image array has NaN or infinite values")
    return np.clip(a, 0.0, 1.0).astype(np.float32)
