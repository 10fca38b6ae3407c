"""One image to its latent tensors: loaded, brought to the training size, flipped, padded; the
model's function; its output split into the tensors of a latent file.

Used by ``encode_files`` for every image, and by the notebook API for one. With ``--flip`` the
model input holds the image and its mirror image side by side on the channel axis (6 channels),
so that both go through the model in the same batch and the flipped one is padded as an image of
its own (on the right, not where the mirror put the padding); the output likewise stacks the
latent, the log-variance (``--posterior``) and the flipped latent's, split again by ``split``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
import torch

from vqcli.io import geometry
from vqcli.io import latents as lat
from vqcli.io.images import DEFAULT_MAX_PIXELS
from vqcli.io.padding import pad_to_multiple, to_model_input
from vqcli.model.autoencoder import AutoEncoder
from vqcli.model.quantize import DiagonalGaussian
from vqcli.pipeline.batching import Item, vq_indices
from vqcli.pipeline.results import Job
from vqcli.pipeline.sources import load_job_image


@dataclass(frozen=True)
class Shape:
    """What one image becomes besides its latent: the options that shape the model's input and output."""

    fit: geometry.Fit | None = None  # resize and crop to a training size (None: as it is, padded)
    crop_seed: int = 0  # random crops: drawn from this and the image's path
    flip: bool = False  # also the latent of the horizontally flipped image
    posterior: bool = False  # KL: the log-variance besides the mean


def derive_seed(seed: int, rel: PurePosixPath) -> int:
    """The seed of one image's draw or crop: from the run's seed and the image's relative path."""
    digest = hashlib.sha256(f"{seed}\0{rel.as_posix()}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def prepare_array(rgb: np.ndarray, model: AutoEncoder, shape: Shape = Shape(), rel: PurePosixPath | None = None):
    """An (H, W, 3) [0, 1] image to the model input and what the latent file records of it:
    ``(x, info)``, ``info`` with the size it decodes to and the placement (original size, crop)."""
    height, width = rgb.shape[:2]
    info: dict = {"width": width, "height": height}
    if shape.fit is not None:
        seed = derive_seed(shape.crop_seed, rel or PurePosixPath(""))
        placement = geometry.place(width, height, shape.fit, seed)
        rgb = geometry.apply(rgb, placement)
        height, width = placement.target_size
        info.update(
            width=width,
            height=height,
            original_size=placement.original_size,
            crop_top_left=placement.crop_top_left,
            crop_ltrb=placement.crop_ltrb,
            bucket=shape.fit.mode == "buckets",
        )
    factor = lat.pad_factor(height, width, model.config.downsampling)
    x = pad_to_multiple(to_model_input(rgb), factor)
    if shape.flip:
        x = torch.cat([x, pad_to_multiple(to_model_input(rgb[:, ::-1]), factor)], dim=1)
    return x, info


def prepare_image(
    job: Job, model: AutoEncoder, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, shape: Shape = Shape()
) -> Item:
    """Load an image (or take the frame a job holds: ``encode --all-frames``), bring it to its size
    and pad it to the model's factor (see ``prepare_array``)."""
    frame = job.frame
    if frame is not None:
        details, rgb = dict(frame.details), frame.rgb
    else:
        details = {}
        rgb = load_job_image(job, max_pixels=max_pixels, details=details)
    x, info = prepare_array(rgb, model, shape, job.rel)
    info.update(image_notes(details))
    if frame is not None:
        info.update(frame.describe())
    return Item(job, x, key=tuple(x.shape), model=model, info=info)


def image_notes(details: dict) -> dict:
    """What a result says about how its image was read (``load_image``'s ``details``):
    ``icc_profile`` (converted to sRGB from), and a ``note`` for people when only the first frame
    of an animated image was used."""
    info = {}
    if "icc_profile" in details:
        info["icc_profile"] = details["icc_profile"]
    if details.get("frames", 1) > 1:
        info["note"] = f"only the first of its {details['frames']} frames was used (an animated image)"
    return info


def encode_fn(kind: str, *, sample: bool, scaled: bool, seed: int | None, shape: Shape = Shape()):
    """``fn(model, x)`` for ``batching.compute``: the stacked outputs ``split`` takes apart."""

    def one(model: AutoEncoder, x: torch.Tensor) -> torch.Tensor:
        if kind == "vq":
            return vq_indices(model, x)  # (-1 where the encoder's output is not finite)
        if not shape.posterior:
            generator = None
            if sample:
                generator = torch.Generator(device=x.device)
                generator.manual_seed(seed)
            return model.encode(x, sample=sample, generator=generator, scaled=scaled).float()
        dist = DiagonalGaussian(model.encode_moments(x).float())
        mean, logvar = dist.mean, dist.logvar
        if scaled:  # the distribution of (z - shift) * scale
            mean = model.scale(mean)
            logvar = logvar + 2.0 * math.log(abs(model.config.scale_factor))
        return torch.cat([mean, logvar], dim=1)

    def fn(model: AutoEncoder, x: torch.Tensor) -> torch.Tensor:
        if not shape.flip:
            return one(model, x)
        both = [one(model, half) for half in x.chunk(2, dim=1)]
        return torch.stack(both, dim=1) if kind == "vq" else torch.cat(both, dim=1)

    return fn


def split(out: torch.Tensor, kind: str, shape: Shape = Shape()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One item's output (without its batch axis) as the latent and the extra tensors by name."""
    if kind == "vq":
        return (out[0], {"latent_flipped": out[1]}) if shape.flip else (out, {})
    names = ["latent", "latent_logvar"] if shape.posterior else ["latent"]
    if shape.flip:
        names += [n.replace("latent", "latent_flipped", 1) for n in names]
    parts = dict(zip(names, out.chunk(len(names), dim=0)))
    return parts.pop("latent"), parts
