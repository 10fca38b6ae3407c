"""``decode_files``: latent files back to images."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqcli.checkpoints.load import resolve_model, with_factors
from vqcli.checkpoints.registry import EMBEDDED_MODELS, embedded_path, is_embedded
from vqcli.errors import FileError, UsageError, VqcliError
from vqcli.io import latents as lat
from vqcli.io.images import DEFAULT_MAX_PIXELS, save_image, written_by_vqcli
from vqcli.io.padding import from_model_output
from vqcli.io.trainer_files import read_any
from vqcli.model.autoencoder import AutoEncoder
from vqcli.pipeline import provenance
from vqcli.pipeline.batching import Item, _compute_and_write, _run, _write, checked, each_job
from vqcli.pipeline.jobs import check_inputs, decoded_name
from vqcli.pipeline.results import FileResult, Job, _from_error
from vqcli.pipeline.selection import Selection, block_size, latent_source, select_jobs
from vqcli.speed.precision import choose_dtype


@dataclass(frozen=True)
class DecodeOptions:
    batch_size: int = 1
    fmt: str = "png"
    quality: int = 95
    overwrite: bool = False
    max_memory: int | None = None  # bytes for one layer's work; None: from the free memory
    io_threads: int = 1  # threads reading latents ahead (plus one writing images behind); 0: none
    compile: bool = False  # torch.compile the coders (images that fit whole; see vqcli.speed.tiling)
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # refuse latents that decode to more (None: no limit)

    def recipe(self) -> dict:
        """What decides an image besides its latent file (whose model the file names)."""
        return {"format": self.fmt, "quality": None if self.fmt == "png" else self.quality}


class ModelChooser:
    """Which model decodes a latent: the one given (checked against the file), or the embedded one
    the file names. Models are loaded once and kept for the run.

    ``dtype=None`` (``--dtype auto``): each embedded model is computed in the precision
    ``accel.choose_dtype`` measures for it; ``on_choice(name, choice)`` hears of each choice.
    """

    def __init__(
        self,
        model: AutoEncoder | None = None,
        label: str = "",
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = torch.float32,
        resolve: Callable[..., AutoEncoder] = resolve_model,
        on_choice: Callable[[str, Any], None] | None = None,
    ):
        self.model, self.label = model, label
        self.device, self.dtype, self.resolve = device, dtype, resolve
        self.on_choice = on_choice
        self._embedded: dict[str, AutoEncoder | VqcliError] = {}
        self._views: dict[tuple, AutoEncoder] = {}
        self._dtypes: dict[int, torch.dtype] = {}  # id(model or view) -> its precision under auto
        self._identities: dict[str, str] | None = None  # an embedded model's weights identity -> its name
        self._lock = threading.Lock()

    def dtype_for(self, model: AutoEncoder) -> torch.dtype:
        """The precision to compute ``model`` (as this chooser returned it) in."""
        return self._dtypes.get(id(model), self.dtype or torch.float32)

    def __call__(self, path: Path, meta: lat.LatentMeta) -> AutoEncoder:
        with self._lock:  # latents are read (and models loaded) from worker threads
            return self._choose(path, meta)

    def _choose(self, path: Path, meta: lat.LatentMeta) -> AutoEncoder:
        if self.model is not None:
            model, label = self.model, self.label
        elif meta.model_embedded and is_embedded(meta.model):
            model, label = self._embedded_model(path, meta.model), f"the embedded model {meta.model!r}"
        elif (name := self._embedded_with_hash(meta.model_sha256)) is not None:
            # made with --model pointing at a copy of an embedded model's weights: the same weights
            model, label = self._embedded_model(path, name), f"the embedded model {name!r}"
        else:
            raise FileError(
                path,
                f"made by the model file {meta.model!r} (sha256 {meta.model_sha256[:12]}); pass that file with --model",
            )
        lat.check_model(path, meta, model, label)
        if not meta.scaled:
            return model
        key = (id(model), meta.scale_factor, meta.shift_factor)
        if key not in self._views:
            self._views[key] = with_factors(model, meta.scale_factor, meta.shift_factor)
            if id(model) in self._dtypes:
                self._dtypes[id(self._views[key])] = self._dtypes[id(model)]
        return self._views[key]

    def _embedded_with_hash(self, sha256: str) -> str | None:
        """The embedded model whose weights have this identity, if any (each installed embedded
        model is loaded once, when a latent of a weights file is first met)."""
        if self._identities is None:
            self._identities = {}
            for name in EMBEDDED_MODELS:
                if not embedded_path(name).is_file():
                    continue
                try:
                    model = self._embedded_model(Path(name), name)
                except FileError:
                    continue
                self._identities.setdefault(model.identity(), name)
        return self._identities.get(sha256)

    def _embedded_model(self, path: Path, name: str) -> AutoEncoder:
        if name not in self._embedded:
            try:
                model = self.resolve(name, device=self.device, dtype=self.dtype or torch.float32)
                if self.dtype is None:
                    choice = choose_dtype(model, torch.device(self.device))
                    self._dtypes[id(model)] = choice.dtype
                    if self.on_choice is not None:
                        self.on_choice(name, choice)
                self._embedded[name] = model
            except VqcliError as e:
                self._embedded[name] = e
        found = self._embedded[name]
        if isinstance(found, VqcliError):
            raise FileError(path, f"made by the embedded model {name!r}, which cannot be loaded: {found}")
        return found


def decode_files(
    inputs: Sequence[Path],
    output_dir: Path,
    models: ModelChooser,
    *,
    dtype: torch.dtype = torch.float32,
    options: DecodeOptions = DecodeOptions(),
    selection: Selection = Selection(),
) -> Iterator[FileResult]:
    """Decode every latent file among ``inputs`` into an image under ``output_dir``.

    ``selection`` chooses this process's share, or takes the inputs from a manifest.
    """
    if options.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    decoded_name("x", options.fmt)  # validates the format
    if selection.entries is None:
        check_inputs(inputs, output_dir)
    stream = each_job(
        select_jobs(latent_source(inputs, output_dir, selection, options.fmt), selection, block_size(options.batch_size)),
        lambda job: prepare_latent(job, models, max_pixels=options.max_pixels),
        overwrite=options.overwrite,
        ours=written_by_vqcli,
        workers=options.io_threads,
        ahead=2 * options.batch_size + 1,
        stale=functools.partial(provenance.image_stale, expected=options.recipe()),
    )

    def how(batch: list[Item]):
        fn = _decode_fn(batch[0].info["kind"], batch[0].info["scaled"])
        return fn, models.dtype_for(batch[0].model) if models.dtype is None else dtype

    finish = functools.partial(_finish_decode, options=options)
    yield from _compute_and_write(stream, options.batch_size, how, finish, options)


def image_mark(job: Job, options: DecodeOptions) -> str:
    """What an image records of its making: the latent file's stamp and the recipe."""
    return provenance.image_mark(job, options.recipe())


def prepare_latent(job: Job, models: ModelChooser, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Item:
    """Read and validate a latent file (refused from its header where it decodes to more than
    ``max_pixels`` pixels) and choose (and check) the model that decodes it."""
    latent = read_any(job.input, max_pixels=max_pixels)
    meta = latent.meta
    model = models(job.input, meta)
    if meta.kind == "vq":
        data = latent.tensor.long().unsqueeze(0)
    else:
        data = latent.tensor.float().unsqueeze(0)
    info = {"width": meta.width, "height": meta.height, "kind": meta.kind, "scaled": meta.scaled}
    return Item(job, data, key=(id(model), meta.kind, meta.scaled, tuple(data.shape)), model=model, info=info)


def _decode_fn(kind: str, scaled: bool):
    if kind == "vq":
        return lambda model, idx: model.decode_indices(idx)
    return lambda model, z: model.decode(z, scaled=scaled)


def _finish_decode(item: Item, out, redone: bool, options: DecodeOptions) -> FileResult:
    job = item.job
    if isinstance(out, FileError):
        return _from_error(job, out)
    info = {"width": item.info["width"], "height": item.info["height"]}
    rgb = from_model_output(out[0], info["height"], info["width"])
    return _write(
        job,
        lambda: save_image(
            rgb,
            job.output,
            fmt=options.fmt,
            quality=options.quality,
            overwrite=options.overwrite,
            mark=image_mark(job, options),
        ),
        redone,
        info,
    )


def decode_array(
    model: AutoEncoder,
    latent: torch.Tensor,
    height: int,
    width: int,
    *,
    dtype: torch.dtype = torch.float32,
    budget: int | None = None,
    scaled: bool = False,
) -> np.ndarray:
    """Inverse of ``encode_array``: the latent back to an (height, width, 3) [0, 1] image
    (``scaled``: a diffusion-ready latent, unscaled with ``model``'s factors). A ``ValueError``
    when the decoder's output is not finite."""
    kind = model.config.kind
    data = (latent.long() if kind == "vq" else latent.float()).unsqueeze(0)
    device = next(model.parameters()).device
    y = checked(_run(model, _decode_fn(kind, scaled), data, device, dtype, budget), "decoder")
    return from_model_output(y[0], height, width)
