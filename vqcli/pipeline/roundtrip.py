"""Encode and decode in one go, and measure what came back.

For each image: PSNR, SSIM, the mean CIEDE2000 colour difference and the mean bias of each
channel of the reconstruction against the original (all on 8-bit RGB, the way a user sees them),
and a labelled side-by-side PNG: original | reconstruction | error map (absolute difference
amplified 4x), with the metrics (``vqcli.pipeline.pictures``). The picture records its input's
stamp and the model's weights hash and dtype (``vqcli.pipeline.provenance``): a re-run keeps it
only when it was made from the same input by the same model. Prints nothing; yields one
``FileResult`` per image with the metrics in its ``info``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from vqcli.errors import FileError
from vqcli.io.images import DEFAULT_MAX_PIXELS, save_image, to_uint8, written_by_vqcli
from vqcli.metrics import channel_bias, ciede2000, psnr, ssim
from vqcli.model.autoencoder import AutoEncoder
from vqcli.pipeline.batching import each_job
from vqcli.pipeline.decode import decode_array
from vqcli.pipeline.encode import encode_array
from vqcli.pipeline.encode_image import image_notes
from vqcli.pipeline.pictures import side_by_side
from vqcli.pipeline.provenance import image_mark, image_stale
from vqcli.pipeline.results import DONE, FileResult, Job
from vqcli.pipeline.selection import Selection, image_source, select_jobs
from vqcli.pipeline.sources import expand_tars, load_job_image
from vqcli.speed.budget import default_budget

SUFFIX = ".roundtrip.png"


def roundtrip_name(image_name: str) -> str:
    """``a.jpg`` -> ``a.jpg.roundtrip.png`` (never the name of an input image)."""
    return image_name + SUFFIX


def roundtrip_image(
    model: AutoEncoder, rgb: np.ndarray, *, dtype: torch.dtype = torch.float32, budget: int | None = None
) -> np.ndarray:
    """The reconstruction of one (H, W, 3) [0, 1] image, as uint8 (``budget``: as ``encode_array``'s)."""
    latent = encode_array(model, rgb, dtype=dtype, budget=budget)
    return to_uint8(decode_array(model, latent, rgb.shape[0], rgb.shape[1], dtype=dtype, budget=budget))


def measure(original: np.ndarray, reconstruction: np.ndarray) -> dict:
    """The quality of a uint8 reconstruction of a uint8 original: ``psnr`` (dB), ``ssim``,
    ``ciede2000`` (mean, of the images read as sRGB) and ``bias`` ([r, g, b] mean levels of 255)."""
    a, b = original.astype(np.float64), reconstruction.astype(np.float64)
    return {
        "psnr": psnr(a, b, data_range=255.0),
        "ssim": ssim(a, b, data_range=255.0),
        "ciede2000": ciede2000(a / 255.0, b / 255.0),
        "bias": list(channel_bias(a / 255.0, b / 255.0)),
    }


def roundtrip_recipe(model: AutoEncoder, dtype: torch.dtype) -> dict:
    """What a roundtrip picture depends on besides its input: the weights and the compute dtype."""
    return {"model_sha256": model.identity(), "dtype": str(dtype).removeprefix("torch.")}


def roundtrip_files(
    paths: Sequence[Path],
    output_dir: Path,
    model: AutoEncoder,
    *,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    selection: Selection = Selection(),
) -> Iterator[FileResult]:
    """One result per image; side-by-side pictures under ``output_dir`` mirroring the inputs
    (``selection``: this process's share, or the inputs of a manifest; see ``vqcli.pipeline``)."""
    jobs = select_jobs(image_source(paths, output_dir, selection, name=roundtrip_name), selection, 1)
    jobs = expand_tars(jobs, roundtrip_name, max_pixels=max_pixels)
    budget = default_budget(next(model.parameters()).device)  # (fixed for the run, as in encode)
    recipe = roundtrip_recipe(model, dtype)
    yield from each_job(
        jobs,
        lambda job: _one(job, model, dtype, overwrite, max_pixels, budget, recipe),
        overwrite=overwrite,
        ours=written_by_vqcli,
        stale=functools.partial(image_stale, expected=recipe),
    )


def _one(
    job: Job, model: AutoEncoder, dtype: torch.dtype, overwrite: bool, max_pixels: int | None, budget: int, recipe: dict
) -> FileResult:
    details: dict = {}
    rgb = load_job_image(job, max_pixels=max_pixels, details=details)
    original = to_uint8(rgb)
    try:
        reconstruction = roundtrip_image(model, rgb, dtype=dtype, budget=budget)
    except ValueError as e:  # NaN or infinite values on the way (see encode_array, decode_array)
        raise FileError(job.input, str(e)) from None
    info = {
        "width": int(rgb.shape[1]),
        "height": int(rgb.shape[0]),
        **measure(original, reconstruction),
        **image_notes(details),
    }
    save_image(side_by_side(original, reconstruction, info["psnr"], info["ssim"], info["ciede2000"]), job.output, overwrite=overwrite, mark=image_mark(job, recipe))
    return FileResult(job.input, job.output, DONE, info=info, job=job)
