"""``encode_files``: images to latent files."""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from vqcli.checkpoints.load import ModelRef
from vqcli.errors import FileError, UsageError
from vqcli.io import latents as lat
from vqcli.io import tarfiles as tario
from vqcli.io import trainer_files
from vqcli.io.atomic import atomic_path
from vqcli.io.frames import DEFAULT_MAX_FRAMES
from vqcli.io.geometry import Fit
from vqcli.io.images import DEFAULT_MAX_PIXELS
from vqcli.io.padding import pad_to_multiple, to_model_input
from vqcli.model.autoencoder import AutoEncoder
from vqcli.pipeline.batching import Item, _compute_and_write, _run, _write, checked, each_job
from vqcli.pipeline.encode_image import Shape, derive_seed, encode_fn, prepare_image, split
from vqcli.pipeline.frames import drop_pixels, frame_jobs, frame_name
from vqcli.pipeline.jobs import check_inputs, encoded_name
from vqcli.pipeline.provenance import input_stamp, recipe_text, stale_reason
from vqcli.pipeline.results import FAILED, SKIPPED, FileResult, Job, MemberJob, TarJob, _from_error
from vqcli.pipeline.selection import Selection, block_size, image_source, select_jobs
from vqcli.pipeline.sources import (
    check_existing,
    expand_tars,
    member_jobs,
)


@dataclass(frozen=True)
class EncodeOptions:
    batch_size: int = 1
    sample: bool = False  # KL: a draw from the latent distribution instead of its mean
    seed: int | None = None  # with sample: each image's draw is seeded from this and its path
    scaled: bool = False  # KL: write diffusion-ready (z - shift) * scale
    overwrite: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    max_memory: int | None = None  # bytes for one layer's work; None: from the free memory
    tar_output: bool = False  # a tar shard's latents go into one tar, not a folder
    io_threads: int = 1  # threads loading images ahead (plus one writing behind); 0: none
    compile: bool = False  # torch.compile the coders (images that fit whole; see vqcli.speed.tiling)
    fit: Fit | None = None  # resize and crop to a training size (--resolution, --size, --buckets)
    crop: str = "center"  # with fit: "center" or "random" (seeded by seed and the image's path)
    flip: bool = False  # also the latent of the horizontally flipped image
    posterior: bool = False  # KL: the mean and the log-variance
    latent_dtype: str = "float32"  # KL: the stored dtype (float32, float16, bfloat16)
    layout: str = "vqcli"  # the files written: vqcli, kohya or comfyui
    all_frames: bool = False  # an animated image gives a latent per frame (pipeline.frames)
    max_frames: int | None = DEFAULT_MAX_FRAMES  # with all_frames: files of more frames fail (None: no limit)

    @property
    def shape(self) -> Shape:
        return Shape(fit=self.fit, crop_seed=self.seed or 0, flip=self.flip, posterior=self.posterior)

    def recipe(self, model: AutoEncoder, frame: bool = False) -> dict:
        """What decides a latent besides its image: recorded in it, compared on resume. ``frame``:
        the latent of one frame of an animated image (a still image's recipe is the same with or
        without --all-frames, as its latent is)."""
        c = model.config
        recipe = {
            "model_sha256": model.identity(),
            "scaled": self.scaled,
            "sample": self.sample,
            "scale_factor": c.scale_factor,  # (recorded, and read by trainers, even when not applied)
            "shift_factor": c.shift_factor,
        }
        if self.sample:
            recipe["seed"] = self.seed
        if self.fit is not None:
            recipe["fit"] = self.fit.describe() + (f",seed={self.seed or 0}" if self.fit.crop == "random" else "")
        if self.flip:
            recipe["flip"] = True
        if self.posterior:
            recipe["posterior"] = True
        if c.kind == "kl" and self.latent_dtype != "float32":
            recipe["latent_dtype"] = self.latent_dtype
        if self.layout != "vqcli":
            recipe["layout"] = self.layout
        if frame:
            recipe["all_frames"] = True
        return recipe


def encode_files(
    inputs: Sequence[Path],
    output_dir: Path,
    model: AutoEncoder,
    ref: ModelRef,
    *,
    dtype: torch.dtype = torch.float32,
    options: EncodeOptions = EncodeOptions(),
    selection: Selection = Selection(),
) -> Iterator[FileResult]:
    """Encode every image among ``inputs`` into a latent file under ``output_dir``.

    ``model`` is ready for inference (``models.resolve_model``); ``ref`` names it in the files.
    ``selection`` chooses this process's share, or takes the inputs from a manifest.
    """
    check_encode_options(model, options)
    if selection.entries is None:
        check_inputs(inputs, output_dir)
    seed = options.seed if options.seed is not None else (secrets.randbits(62) if options.sample else None)
    # A draw is seeded per image, so it must not depend on the company in its batch.
    batch_size = 1 if options.sample else options.batch_size

    name = functools.partial(trainer_files.output_name, options.layout)
    make = image_source(inputs, output_dir, selection, name=name, tar_output=options.tar_output)
    jobs = select_jobs(make, selection, block_size(batch_size))
    for into_tar, group in itertools.groupby(jobs, key=lambda j: isinstance(j, TarJob) and j.to_tar):
        if into_tar:
            for tar in group:
                yield from _encode_into_tar(tar, model, ref, seed, batch_size, dtype, options)
        else:
            yield from _encode_stream(expand_tars(group, name, max_pixels=options.max_pixels), model, ref, seed, batch_size, dtype, options)


def _encode_stream(jobs, model, ref, seed, batch_size, dtype, options, put=None) -> Iterator[FileResult]:
    """Load, batch, encode and write the images of ``jobs`` (into files, or with ``put``)."""
    if options.all_frames:
        name = functools.partial(trainer_files.output_name, options.layout)
        leftover = _remove_ours if options.overwrite and put is None else None
        jobs = frame_jobs(jobs, name, max_pixels=options.max_pixels, max_frames=options.max_frames, leftover=leftover)
    stream = each_job(
        jobs,
        lambda job: prepare_image(job, model, max_pixels=options.max_pixels, shape=options.shape),
        overwrite=options.overwrite,
        ours=trainer_files.is_ours,
        workers=options.io_threads,
        ahead=2 * batch_size + 1,
        stale=functools.partial(_stale, recipe=functools.partial(options.recipe, model)),
    )

    def how(batch: list[Item]):
        kind, shape = model.config.kind, options.shape
        if not options.sample:
            return encode_fn(kind, sample=False, scaled=options.scaled, seed=None, shape=shape), dtype
        job, frame = batch[0].job, batch[0].job.frame  # (each frame of an animated image its own draw)
        rel = job.rel if frame is None else job.rel.with_name(frame_name(job.rel.name, frame.index, frame.count))
        image_seed = derive_seed(seed, rel)
        batch[0].info["seed"] = image_seed
        return encode_fn(kind, sample=True, scaled=options.scaled, seed=image_seed, shape=shape), dtype

    finish = functools.partial(_finish_encode, ref=ref, options=options, put=put)
    # (``yield from``: a Ctrl-C thrown in between two results must reach the write-behind, which
    # then reports the files it finished meanwhile)
    yield from _compute_and_write(map(drop_pixels, stream), batch_size, how, finish, options)


def _encode_into_tar(tar: TarJob, model, ref, seed, batch_size, dtype, options) -> Iterator[FileResult]:
    """Encode a tar shard's images into the tar ``tar.output`` (``shard.tar/KEY.jpg`` ->
    ``KEY.jpg.safetensors`` in it). The tar appears whole, or not at all; its members' results
    are given once it is there. An output tar that exists is skipped (resume) unless
    ``--overwrite``, or ``tar.redo`` and it is vqcli's."""
    out = tar.output
    if os.path.lexists(out) and not (tar.redo and out.is_file() and tario.is_vqcli_tar(out)):
        done = check_existing(tar, overwrite=options.overwrite, ours=tario.is_vqcli_tar)
        if done is not None:
            yield done
            return
    results: list[FileResult] = []
    try:
        with tario.write_tar(out, overwrite=os.path.lexists(out)) as sink:

            def put(job: Job, data: bytes) -> None:
                sink.add(job.output.relative_to(out).as_posix(), data, job.mtime)

            for result in _encode_stream(member_jobs(tar, encoded_name, max_pixels=options.max_pixels), model, ref, seed, batch_size, dtype, options, put):
                if isinstance(result.job, MemberJob):  # kept until the tar is whole: not its image's bytes
                    result.job = replace(result.job, data=b"")
                results.append(result)
    except FileExistsError:
        yield FileResult(tar.input, out, SKIPPED, "exists (written meanwhile by another run)", job=tar)
        return
    except OSError as e:
        yield FileResult(tar.input, out, FAILED, f"cannot write {out} ({e.strerror or e})", job=tar)
        return
    yield from results


def latent_bytes(tensor: torch.Tensor, meta: lat.LatentMeta, extras: dict | None = None) -> bytes:
    """A latent file's bytes, as ``latents.write_latent`` writes them (for a member of a tar)."""
    from safetensors.torch import save

    return save(lat.stored_tensors(tensor, meta, extras), metadata=meta.to_metadata())


def _write_bytes(path: Path, layout: str, tensor, meta, extras, overwrite: bool) -> None:
    data = trainer_files.layout_bytes(layout, tensor, meta, extras)
    with atomic_path(path, overwrite=overwrite) as tmp, open(tmp, "wb") as f:
        f.write(data)


def _remove_ours(path: Path) -> None:
    """A latent file of vqcli's (a frame an earlier version of its image had) removed; others kept."""
    if path.is_file() and not path.is_symlink() and trainer_files.is_ours(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _stale(job: Job, out: Path, recipe) -> str | None:
    stamp, found = trainer_files.read_provenance(out)
    return stale_reason(input_stamp(job), recipe(frame=job.frame is not None), stamp, found)


def check_encode_options(model: AutoEncoder, options: EncodeOptions) -> None:
    if options.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if model.config.kind == "vq" and (options.sample or options.scaled or options.posterior):
        raise UsageError("--sample, --scaled and --posterior apply to KL models; a VQ model's latents are codebook indices")
    if options.posterior and options.sample:
        raise UsageError("--posterior stores the mean and the log-variance; it does not go with --sample")
    if options.layout not in trainer_files.LAYOUTS:
        raise UsageError(f"--layout must be one of {', '.join(trainer_files.LAYOUTS)}")
    if options.layout != "vqcli" and model.config.kind == "vq":
        raise UsageError(f"--layout {options.layout} holds KL latents; a VQ model's latents are codebook indices")
    if options.layout == "comfyui" and options.scaled:
        raise UsageError("--layout comfyui stores the model's raw latents (ComfyUI scales them itself): drop --scaled")
    if options.layout == "kohya" and options.latent_dtype == "bfloat16":
        raise UsageError("--layout kohya writes numpy arrays, which have no bfloat16: use float16 or float32")
    if options.layout != "vqcli" and options.tar_output:
        raise UsageError("--tar-output writes vqcli's layout only")
    if options.all_frames and options.layout == "kohya":
        raise UsageError(
            "--all-frames does not go with --layout kohya: sd-scripts finds a latent by its image file's name, "
            "and frames have no files of their own (use --layout vqcli or comfyui, or extract the frames first)"
        )
    if options.max_frames is not None and options.max_frames < 0:
        raise UsageError("--max-frames must be 0 (no limit) or more")
    if options.latent_dtype not in lat.FLOAT_DTYPES:
        raise UsageError(f"--latent-dtype must be one of {', '.join(lat.FLOAT_DTYPES)}")


def _finish_encode(item: Item, out, redone: bool, ref: ModelRef, options: EncodeOptions, put=None) -> FileResult:
    job = item.job
    if isinstance(out, FileError):
        return _from_error(job, out)
    model = item.model
    meta = lat.make_meta(
        model,
        source=job.rel.as_posix(),
        width=item.info["width"],
        height=item.info["height"],
        model_name=ref.name,
        model_embedded=ref.embedded,
        representation="indices" if model.config.kind == "vq" else ("sample" if options.sample else "mean"),
        scaled=options.scaled,
        seed=item.info.get("seed"),
        input_stamp=input_stamp(job),
        recipe=recipe_text(options.recipe(model, frame=job.frame is not None)),
        original_size=item.info.get("original_size"),
        crop_top_left=item.info.get("crop_top_left", (0, 0)),
        bucket=item.info.get("bucket", False),
        dtype=options.latent_dtype,
        icc_profile=item.info.get("icc_profile"),
        frame=(job.frame.index, job.frame.count) if job.frame is not None else None,
        frame_duration_ms=job.frame.duration_ms if job.frame is not None else None,
    )
    tensor, extras = split(out[0], model.config.kind, options.shape)
    kept = ("width", "height", "seed", "note", "icc_profile", "frame", "frames", "frame_duration_ms")
    info = {k: v for k, v in item.info.items() if k in kept}
    if put is not None:
        return _write(job, lambda: put(job, latent_bytes(tensor, meta, extras)), redone, info)
    if options.layout != "vqcli":
        write = functools.partial(_write_bytes, job.output, options.layout, tensor, meta, extras, options.overwrite)
        return _write(job, write, redone, info)
    write = functools.partial(lat.write_latent, job.output, tensor, meta, overwrite=options.overwrite, extras=extras)
    return _write(job, write, redone, info)


def encode_array(
    model: AutoEncoder, rgb: np.ndarray, *, dtype: torch.dtype = torch.float32, budget: int | None = None
) -> torch.Tensor:
    """One (H, W, 3) [0, 1] image to its latent (KL mean ``(C, h, w)`` or VQ indices ``(h, w)``);
    ``budget`` as ``--max-memory`` (None: from the memory free now). A ``ValueError`` when the
    encoder's output is not finite."""
    height, width = rgb.shape[:2]
    x = pad_to_multiple(to_model_input(rgb), lat.pad_factor(height, width, model.config.downsampling))
    device = next(model.parameters()).device
    fn = encode_fn(model.config.kind, sample=False, scaled=False, seed=None)
    return checked(_run(model, fn, x, device, dtype, budget), "encoder")[0]
