"""Several models over the same images: which one keeps them best.

Each image is read once and round-tripped by every model in turn, exactly as a one-model roundtrip
does it (``roundtrip_image``, ``measure``), so each model's numbers equal those of a run with that
model alone. One picture per image, ``a.jpg`` -> ``a.jpg.compare.png`` (never the name of a
one-model run's ``a.jpg.roundtrip.png``): original | each model's reconstruction, labelled
(``vqcli.pipeline.pictures.comparison``). The picture records its input's stamp and the models'
weights hashes and dtypes (``vqcli.pipeline.provenance``), so a re-run keeps it only when it
compares the same models on the same input. Prints nothing; yields one ``FileResult`` per image,
``info["models"]`` holding each model's metrics and compute ``seconds``, in the models' order.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vqcli.errors import FileError
from vqcli.io.images import DEFAULT_MAX_PIXELS, save_image, to_uint8, written_by_vqcli
from vqcli.model.autoencoder import AutoEncoder
from vqcli.pipeline.batching import each_job
from vqcli.pipeline.encode_image import image_notes
from vqcli.pipeline.pictures import comparison
from vqcli.pipeline.provenance import image_mark, image_stale
from vqcli.pipeline.results import DONE, FileResult, Job
from vqcli.pipeline.roundtrip import measure, roundtrip_image, roundtrip_recipe
from vqcli.pipeline.selection import Selection, image_source, select_jobs
from vqcli.pipeline.sources import expand_tars, load_job_image
from vqcli.speed.budget import default_budget

SUFFIX = ".compare.png"


def compare_name(image_name: str) -> str:
    """``a.jpg`` -> ``a.jpg.compare.png``."""
    return image_name + SUFFIX


@dataclass(frozen=True)
class Contender:
    """One model of a comparison: its name (as shown), the model and its compute dtype."""

    name: str
    model: AutoEncoder
    dtype: torch.dtype = torch.float32


def compare_recipe(contenders: Sequence[Contender]) -> dict:
    """What a comparison picture depends on: the models' weights hashes and dtypes, in order."""
    recipes = [roundtrip_recipe(c.model, c.dtype) for c in contenders]
    return {"model_sha256": ",".join(r["model_sha256"] for r in recipes), "dtypes": [r["dtype"] for r in recipes]}


def compare_files(
    paths: Sequence[Path],
    output_dir: Path,
    contenders: Sequence[Contender],
    *,
    overwrite: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    selection: Selection = Selection(),
) -> Iterator[FileResult]:
    """One result per image; comparison pictures under ``output_dir`` mirroring the inputs."""
    if len(contenders) < 2:
        raise ValueError("a comparison needs at least two models")
    jobs = select_jobs(image_source(paths, output_dir, selection, name=compare_name), selection, 1)
    jobs = expand_tars(jobs, compare_name, max_pixels=max_pixels)
    budgets = [default_budget(next(c.model.parameters()).device) for c in contenders]  # (as roundtrip_files)
    recipe = compare_recipe(contenders)
    yield from each_job(
        jobs,
        lambda job: _one(job, contenders, budgets, recipe, overwrite, max_pixels),
        overwrite=overwrite,
        ours=written_by_vqcli,
        stale=functools.partial(image_stale, expected=recipe),
    )


def _one(
    job: Job, contenders: Sequence[Contender], budgets: list[int], recipe: dict, overwrite: bool, max_pixels: int | None
) -> FileResult:
    details: dict = {}
    rgb = load_job_image(job, max_pixels=max_pixels, details=details)
    original = to_uint8(rgb)
    panels, scores = [], []
    for contender, budget in zip(contenders, budgets):
        start = time.perf_counter()
        try:
            reconstruction = roundtrip_image(contender.model, rgb, dtype=contender.dtype, budget=budget)
        except ValueError as e:  # NaN or infinite values on the way (see encode_array, decode_array)
            raise FileError(job.input, f"{contender.name}: {e}") from None
        seconds = time.perf_counter() - start  # (the reconstruction is on the CPU: the device is done)
        metrics = measure(original, reconstruction)
        panels.append((contender.name, reconstruction, metrics))
        scores.append({**metrics, "seconds": seconds})
    info = {"width": int(rgb.shape[1]), "height": int(rgb.shape[0]), "models": scores, **image_notes(details)}
    save_image(comparison(original, panels), job.output, overwrite=overwrite, mark=image_mark(job, recipe))
    return FileResult(job.input, job.output, DONE, info=info, job=job)
