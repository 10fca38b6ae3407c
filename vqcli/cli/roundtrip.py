"""``vqcli roundtrip``: encode and decode in one go and report the quality."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vqcli.cli._app import app, handle_errors, out_console
from vqcli.cli.common import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MaxPixelsOpt,
    ModelOpt,
    OverwriteOpt,
    PresetOpt,
    ProgressOpt,
    QuietOpt,
    dtype_name,
    epilog,
    help_text,
    left_out_of,
    settle_dtype,
    setup_device,
    write_gallery_reported,
)
from vqcli.cli.quality import fill_mean, quality_table, scores
from vqcli.cli.scale import FromManifestOpt, ManifestOpt, Scale, ShardOpt, run
from vqcli.io.images import DEFAULT_MAX_PIXELS

HELP = help_text(
    """
    Encode and decode images in one go and measure the reconstruction.

    For each image: PSNR (dB), SSIM and the colour difference (ΔE00: mean CIEDE2000, about 2.3 is
    just noticeable) of the reconstruction against the original, all on 8-bit RGB, and a
    side-by-side picture under OUTPUT (a.png -> a.png.roundtrip.png): original | reconstruction |
    error map (absolute difference, 4x). A table of the metrics and their mean follows the run;
    with --json they are in the summary object, with each channel's mean bias ("bias": red, green, blue,
    in levels of 255: a colour shift of wide regions shows there).

    Like encode, it reads tar shards (shard.tar/KEY.jpg -> OUTPUT/shard.tar/KEY.jpg.roundtrip.png)
    and runs in many processes under torchrun or with --shard I/N; rank 0 prints the table of all.
    """
)


@app.command(
    help=HELP,
    epilog=epilog(
        "vqcli roundtrip sample_images -o roundtrip",
        "vqcli roundtrip photos/ -o check --model default-vq --json",
        "torchrun --nproc_per_node=4 -m vqcli roundtrip photos/ -o check --json",
    ),
)
@handle_errors
def roundtrip(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the side-by-side pictures.")],
    inputs: Annotated[Optional[list[Path]], typer.Argument(metavar="INPUT...", help="Image files, folders and tar shards of images.", show_default=False)] = None,
    model: ModelOpt = "default",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    preset: PresetOpt = None,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    overwrite: OverwriteOpt = False,
    shard: ShardOpt = None,
    manifest: ManifestOpt = None,
    from_manifest: FromManifestOpt = None,
    quiet: QuietOpt = False,
    progress: ProgressOpt = "auto",
    gallery: Annotated[bool, typer.Option("--gallery/--no-gallery", help="Write OUTPUT/index.html: every picture, PSNR, SSIM and ΔE00, sortable, original or reconstruction alone.")] = True,
    as_json: JsonOpt = False,
) -> None:
    from vqcli.checkpoints.load import model_ref, resolve_model
    from vqcli.pipeline.results import DONE
    from vqcli.pipeline.roundtrip import roundtrip_files, roundtrip_name
    from vqcli.pipeline.selection import count_selected, image_source

    scale = Scale(inputs, output, shard=shard, manifest=manifest, from_manifest=from_manifest)
    torch_device, torch_dtype = setup_device(device, dtype)
    torch_device = scale.start(torch_device)
    ae = resolve_model(model, device=torch_device, dtype=torch_dtype, preset=preset)
    torch_dtype = scale.same(settle_dtype(ae, torch_device, torch_dtype))
    ref = model_ref(model)
    images: list[dict] = []
    mean: dict = {}
    selection = scale.selection()
    source = image_source(inputs or [], output, selection, name=roundtrip_name)
    report = scale.report(
        "roundtrip",
        verb="round-tripped",
        count=lambda: count_selected(source, selection, 1),
        quiet=quiet,
        progress=progress,
        left_out=None if (from_manifest or shard or scale.ctx.active) else left_out_of(inputs, output, 'an image or a tar shard'),
        as_json=as_json,
        extra={
            "output": str(output),
            "model": {"name": ref.name, "sha256": ae.identity(), "kind": ae.config.kind},
            "device": str(torch_device),
            "dtype": dtype_name(torch_dtype),
            "images": images,
            "mean": mean,
        },
    )

    def measured(results):
        for r in results:
            if r.status == DONE:
                images.append({"path": str(r.input), **scores(r.info), "picture": str(r.output), "width": r.info["width"], "height": r.info["height"]})
                fill_mean(images, mean)
            yield r

    def combine(per_process: list[list[dict]]) -> None:  # every process's rows, for rank 0's table
        images[:] = [row for rows in per_process for row in rows]
        fill_mean(images, mean)

    results = roundtrip_files(
        inputs or [], output, ae, dtype=torch_dtype, overwrite=overwrite, max_pixels=max_pixels or None, selection=selection
    )
    try:
        run(report, measured(results), scale, gather=lambda: list(images), combine=combine)
    finally:
        if images and gallery and scale.main:
            _gallery(output, images, quiet)
        if images and not as_json and not quiet and scale.main:
            out_console.print(quality_table(images, mean))


def _gallery(output: Path, images: list[dict], quiet: bool) -> None:
    from vqcli.pipeline.gallery import write_gallery

    write_gallery_reported(output / "index.html", lambda: write_gallery(output, images), quiet)
