"""``vqcli decode``: latent files back to images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vqcli.cli._app import app, err_console, handle_errors, shown
from vqcli.cli.common import (
    BatchOpt,
    CompileOpt,
    DeviceOpt,
    DtypeOpt,
    IoThreadsOpt,
    JsonOpt,
    MaxMemoryOpt,
    MaxPixelsOpt,
    OptionalModelOpt,
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
from vqcli.cli.scale import FromManifestOpt, ManifestOpt, Scale, ShardOpt, run
from vqcli.io.images import DEFAULT_MAX_PIXELS

HELP = help_text(
    """
    Decode latent files back into images at their original width and height.

    Everything needed comes from each file: the model (an embedded model by its name; a latent
    made with a weights file needs that file again with --model), the scale and shift, the
    original size. A latent made by a different model than --model is refused.

    The relative layout of the inputs is mirrored under OUTPUT: 'a.png.safetensors' becomes
    'a.png'; a name whose extension is not the output format's gets it appended
    ('a.jpg.safetensors' -> 'a.jpg.png'). Existing images vqcli wrote are kept (the run resumes)
    unless --overwrite; files vqcli did not write (the original images, say) are never replaced.

    Many processes: under 'torchrun --nproc_per_node=N -m vqcli decode ...' each process decodes
    its share of the latents (balanced by size) on its own GPU; --shard I/N splits the same way
    for independent jobs; --manifest and --from-manifest work as for encode.
    """
)


@app.command(
    help=HELP,
    epilog=epilog(
        "vqcli decode latents -o recon",
        "vqcli decode latents/a.png.safetensors -o recon --format jpg --quality 90",
        "vqcli decode latents -o recon --model sd-vae.safetensors --batch-size 4 --json",
        "torchrun --nproc_per_node=8 -m vqcli decode latents -o recon --batch-size 8",
    )
)
@handle_errors
def decode(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the images (created if needed).")],
    inputs: Annotated[Optional[list[Path]], typer.Argument(metavar="INPUT...", help="Latent files and folders of them (walked recursively).", show_default=False)] = None,
    model: OptionalModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    batch_size: BatchOpt = 1,
    fmt: Annotated[str, typer.Option("--format", "-f", help="Image format: png, jpg or webp.")] = "png",
    quality: Annotated[int, typer.Option("--quality", min=1, max=100, help="jpg and webp quality.")] = 95,
    preset: PresetOpt = None,
    subfolder: SubfolderOpt = None,
    max_memory: MaxMemoryOpt = None,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    io_threads: IoThreadsOpt = 1,
    compile: CompileOpt = False,
    overwrite: OverwriteOpt = False,
    shard: ShardOpt = None,
    manifest: ManifestOpt = None,
    from_manifest: FromManifestOpt = None,
    quiet: QuietOpt = False,
    progress: ProgressOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    from vqcli.checkpoints.load import resolve_model
    from vqcli.pipeline.decode import DecodeOptions, ModelChooser, decode_files
    from vqcli.pipeline.selection import block_size, count_selected, latent_source

    scale = Scale(inputs, output, shard=shard, manifest=manifest, from_manifest=from_manifest)
    fmt = fmt.lower().lstrip(".")
    fmt = {"jpeg": "jpg"}.get(fmt, fmt)
    if fmt not in ("png", "jpg", "webp"):
        raise typer.BadParameter(f"{fmt!r} is not one of png, jpg, webp", param_hint="'--format'")
    torch_device, torch_dtype = setup_device(device, dtype)
    torch_device = scale.start(torch_device)
    if model is not None:
        ae = resolve_model(model, device=torch_device, dtype=torch_dtype, preset=preset, subfolder=subfolder)
        torch_dtype = scale.same(settle_dtype(ae, torch_device, torch_dtype))
        chooser = ModelChooser(ae, f"--model {model}", device=torch_device, dtype=torch_dtype)
        model_info = {"name": model, "sha256": ae.identity(), "kind": ae.config.kind}
    else:
        chooser = ModelChooser(
            device=torch_device,
            dtype=torch_dtype,
            on_choice=lambda name, choice: err_console.print(f"{shown(name)}: {choice.describe()}", highlight=False),
        )
        model_info = None
    options = DecodeOptions(
        batch_size=batch_size,
        fmt=fmt,
        quality=quality,
        overwrite=overwrite,
        max_memory=scale.max_memory(parse_max_memory(max_memory), torch_device),
        io_threads=io_threads,
        compile=compile,
        max_pixels=max_pixels or None,
    )
    selection = scale.selection()
    results = decode_files(inputs or [], output, chooser, dtype=torch_dtype, options=options, selection=selection)
    extra = {"output": str(output), "model": model_info, "device": str(torch_device), "dtype": dtype_name(torch_dtype) if torch_dtype else "auto", "format": fmt}
    source = latent_source(inputs or [], output, selection, fmt)
    report = scale.report(
        "decode",
        verb="decoded",
        count=lambda: count_selected(source, selection, block_size(batch_size)),
        quiet=quiet,
        progress=progress,
        left_out=None if (from_manifest or shard or scale.ctx.active) else left_out_of(inputs, output, 'a latent file (.safetensors)', latents=True),
        as_json=as_json,
        extra=extra,
    )
    run(report, results, scale)
