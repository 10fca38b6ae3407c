"""``vqcli encode``: images to latent files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vqcli.cli._app import app, handle_errors
from vqcli.cli.common import (
    BatchOpt,
    CompileOpt,
    DeviceOpt,
    DtypeOpt,
    IoThreadsOpt,
    JsonOpt,
    MaxMemoryOpt,
    MaxPixelsOpt,
    ModelOpt,
    OverwriteOpt,
    PresetOpt,
    ProgressOpt,
    QuietOpt,
    SubfolderOpt,
    dtype_name,
    epilog,
    help_text,
    left_out_of,
    parse_max_memory,
    settle_dtype,
    setup_device,
)
from vqcli.cli.scale import (
    FromManifestOpt,
    ManifestOpt,
    Scale,
    ShardOpt,
    TarOutputOpt,
    run,
)
from vqcli.io.frames import DEFAULT_MAX_FRAMES
from vqcli.io.images import DEFAULT_MAX_PIXELS

HELP = help_text(
    """
    Encode images into latent files, one per image.

    Each image's path relative to the folder it was found in is mirrored under OUTPUT, with
    '.safetensors' appended to its whole name (a.png -> a.png.safetensors, so a.png and a.jpg do
    not collide). Files in folders whose extension is not an image format are skipped. Existing
    latent files are kept (the run resumes) unless --overwrite.

    Every image is read as RGB: EXIF orientation applied, transparency composited over white,
    animated images by their first frame (with a note), or with --all-frames frame by frame:
    anim.gif -> anim.gif.frame0000.safetensors, anim.gif.frame0001.safetensors, ... (each frame
    whole, as a viewer shows it; the latent records frame, frames and frame_duration_ms; a still
    image gives its usual single file; a file of more than --max-frames frames fails; a damaged
    frame fails naming it, the frames before it kept; --overwrite also removes the frame files an
    earlier version of the image had beyond its frame count). It is padded on the right and bottom to a multiple of
    the model's downsampling factor by mirroring, and its original size is recorded, so that
    'vqcli decode' gives back exactly that size.

    Latent files are plain safetensors: the tensor 'latent' (KL: the mean, float32 (C, h, w);
    VQ: codebook indices, int16 (h, w)) with the model, its config and the image size in the
    metadata. 'vqcli info FILE' shows it all.

    Tar shards (WebDataset style: shard.tar holding KEY.jpg, KEY.json, ...) are read front to
    back; each image's latent goes to OUTPUT/shard.tar/KEY.jpg.safetensors, or with --tar-output
    into one tar OUTPUT/shard.tar.

    Many processes: 'torchrun --nproc_per_node=N -m vqcli encode ...' gives each process (one per
    GPU) a share of the inputs, balanced by size, with the same files as one process would write;
    rank 0 prints the summary of all. --shard I/N does the same split for independent jobs (SLURM
    arrays). --manifest writes OUTPUT/manifest.jsonl, a line per input; --from-manifest FILE
    redoes only what failed or is missing.
    """
)


@app.command(
    help=HELP,
    epilog=epilog(
        "vqcli encode sample_images -o latents",
        "vqcli encode photos/ extra.jpg -o latents --model default-vq --batch-size 4",
        "vqcli encode photos/ -o latents --model sd-vae.safetensors --scaled --json",
        "torchrun --nproc_per_node=8 -m vqcli encode shards/ -o latents --tar-output --batch-size 16",
        "vqcli encode photos/ -o latents --shard $SLURM_ARRAY_TASK_ID/64",
        "vqcli encode --from-manifest latents/manifest.jsonl -o latents",
    )
)
@handle_errors
def encode(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the latent files (created if needed).")],
    inputs: Annotated[Optional[list[Path]], typer.Argument(metavar="INPUT...", help="Image files, folders (walked recursively) and tar shards of images.", show_default=False)] = None,
    model: ModelOpt = "default",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    batch_size: BatchOpt = 1,
    sample: Annotated[bool, typer.Option("--sample", help="KL models: store a draw from the latent distribution, not its mean.")] = False,
    seed: Annotated[Optional[int], typer.Option("--seed", min=0, help="With --sample: seed of the draws (each image's draw also depends on its path).")] = None,
    scaled: Annotated[bool, typer.Option("--scaled", help="KL models: store diffusion-ready latents, (z - shift_factor) * scale_factor.")] = False,
    scale_factor: Annotated[Optional[float], typer.Option("--scale-factor", help="Override the model's latent scale factor.")] = None,
    shift_factor: Annotated[Optional[float], typer.Option("--shift-factor", help="Override the model's latent shift factor.")] = None,
    resolution: Annotated[Optional[int], typer.Option("--resolution", min=1, help="Training size: resize the short side to N (LANCZOS), then crop to N x N (with --buckets: buckets of about N*N pixels).", rich_help_panel="Training sets")] = None,
    size: Annotated[Optional[str], typer.Option("--size", metavar="WxH", help="Training size: resize to cover WxH, then crop to it.", rich_help_panel="Training sets")] = None,
    crop: Annotated[str, typer.Option("--crop", help="center, or random (seeded by --seed and each image's path, so shards agree).", rich_help_panel="Training sets")] = "center",
    buckets: Annotated[bool, typer.Option("--buckets", help="With --resolution N: aspect-ratio buckets of about N*N pixels, sides multiples of the model's factor times 8; each image goes to the nearest ratio.", rich_help_panel="Training sets")] = False,
    flip: Annotated[bool, typer.Option("--flip", help="Also store the latent of the horizontally flipped image (latent_flipped).", rich_help_panel="Training sets")] = False,
    posterior: Annotated[bool, typer.Option("--posterior", help="KL models: store the mean and the log-variance (latent_logvar), so that a trainer can sample.", rich_help_panel="Training sets")] = False,
    latent_dtype: Annotated[str, typer.Option("--latent-dtype", help="KL models: the stored dtype: float32, float16 or bfloat16 (computation keeps --dtype).", rich_help_panel="Training sets")] = "float32",
    all_frames: Annotated[bool, typer.Option("--all-frames", help="Animated images (GIF, APNG, WebP, multi-page TIFF): a latent per frame, anim.gif -> anim.gif.frame0000.safetensors, ... (default: the first frame only, with a note).")] = False,
    max_frames: Annotated[int, typer.Option("--max-frames", min=0, help="With --all-frames: a file of more frames fails, before any is decoded (0: no limit).")] = DEFAULT_MAX_FRAMES,
    layout: Annotated[str, typer.Option("--layout", help="Files for: vqcli (.safetensors), kohya (sd-scripts' .npz latent cache) or comfyui (.latent).", rich_help_panel="Training sets")] = "vqcli",
    preset: PresetOpt = None,
    subfolder: SubfolderOpt = None,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    max_memory: MaxMemoryOpt = None,
    io_threads: IoThreadsOpt = 1,
    compile: CompileOpt = False,
    overwrite: OverwriteOpt = False,
    tar_output: TarOutputOpt = False,
    shard: ShardOpt = None,
    manifest: ManifestOpt = None,
    from_manifest: FromManifestOpt = None,
    quiet: QuietOpt = False,
    progress: ProgressOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    from vqcli.checkpoints.load import model_ref, resolve_model
    from vqcli.pipeline.encode import EncodeOptions, encode_files
    from vqcli.pipeline.selection import block_size, count_selected, image_source

    if latent_dtype not in ("float32", "float16", "bfloat16"):
        raise typer.BadParameter("must be float32, float16 or bfloat16", param_hint="--latent-dtype")
    if layout not in ("vqcli", "kohya", "comfyui"):
        raise typer.BadParameter("must be vqcli, kohya or comfyui", param_hint="--layout")
    scale = Scale(inputs, output, shard=shard, manifest=manifest, from_manifest=from_manifest)
    torch_device, torch_dtype = setup_device(device, dtype)
    torch_device = scale.start(torch_device)
    ae = resolve_model(
        model,
        device=torch_device,
        dtype=torch_dtype,
        preset=preset,
        scale_factor=scale_factor,
        shift_factor=shift_factor,
        subfolder=subfolder,
    )
    torch_dtype = scale.same(settle_dtype(ae, torch_device, torch_dtype))
    ref = model_ref(model, subfolder)
    options = EncodeOptions(
        fit=training_fit(resolution, size, crop, buckets, 8 * ae.config.downsampling),
        flip=flip,
        posterior=posterior,
        latent_dtype=latent_dtype,
        layout=layout,
        batch_size=batch_size,
        sample=sample,
        seed=scale.seed(sample, seed),
        scaled=scaled,
        overwrite=overwrite,
        max_pixels=max_pixels or None,
        max_memory=scale.max_memory(parse_max_memory(max_memory), torch_device),
        io_threads=io_threads,
        compile=compile,
        tar_output=tar_output,
        all_frames=all_frames,
        max_frames=max_frames or None,
    )
    selection = scale.selection()
    results = encode_files(inputs or [], output, ae, ref, dtype=torch_dtype, options=options, selection=selection)
    extra = {
        "output": str(output),
        "model": {"name": ref.name, "sha256": ae.identity(), "kind": ae.config.kind},
        "device": str(torch_device),
        "dtype": dtype_name(torch_dtype),
    }
    source = image_source(inputs or [], output, selection, tar_output=tar_output)  # (counting: names do not matter)
    size = block_size(1 if sample else batch_size)
    report = scale.report(
        "encode",
        verb="encoded",
        # (with --all-frames a file may give many results: how many is not known before it is read)
        count=None if all_frames else (lambda: count_selected(source, selection, size)),
        quiet=quiet,
        progress=progress,
        left_out=None if (from_manifest or shard or scale.ctx.active) else left_out_of(inputs, output, 'an image or a tar shard'),
        as_json=as_json,
        extra=extra,
    )
    run(report, results, scale)


def training_fit(resolution: int | None, size: str | None, crop: str, buckets: bool, step: int):
    """The training size asked for (``vqcli.io.geometry.Fit``), or None for images as they are."""
    from vqcli.io.geometry import Fit, parse_size

    if crop not in ("center", "random"):
        raise typer.BadParameter("must be center or random", param_hint="--crop")
    if resolution is not None and size is not None:
        raise typer.BadParameter("give --resolution or --size, not both", param_hint="--size")
    if buckets and resolution is None:
        raise typer.BadParameter("needs --resolution N (buckets of about N*N pixels)", param_hint="--buckets")
    if size is not None:
        try:
            width, height = parse_size(size)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--size") from None
        return Fit("size", width, height, crop=crop)
    if resolution is None:
        return None
    if buckets and resolution < step:
        raise typer.BadParameter(f"buckets need --resolution of at least {step} for this model", param_hint="--resolution")
    return Fit("buckets" if buckets else "resolution", resolution, resolution, crop=crop, step=step)
