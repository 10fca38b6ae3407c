"""``vqcli roundtrip``: encode and decode in one go and report the quality."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vqcli.cli._app import app, handle_errors, out_console
from vqcli.cli.common import (
    MODEL_HELP,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MaxPixelsOpt,
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
from vqcli.cli.quality import comparison_table, fill_mean, quality_table, scores
from vqcli.cli.scale import FromManifestOpt, ManifestOpt, Scale, ShardOpt, run
from vqcli.errors import UsageError
from vqcli.io.images import DEFAULT_MAX_PIXELS

HELP = help_text(
    """
    Encode and decode images in one go and measure the reconstruction.

    For each image: PSNR (dB), SSIM and the colour difference (ΔE00: mean CIEDE2000, about 2.3 is
    just noticeable) of the reconstruction against the original, all on 8-bit RGB, and a
    side-by-side picture under OUTPUT (a.png -> a.png.roundtrip.png): original | reconstruction |
    error map (absolute difference, 4x). A table of the metrics and their mean follows the run;
    with --json they are in the summary object, with each channel's mean bias ("bias": red, green, blue,
    in levels of 255: a colour shift of wide regions shows there). A re-run keeps a picture only
    when it was made from the same input by the same model (weights and dtype); otherwise that image
    fails saying why, and --overwrite replaces it.

    Like encode, it reads tar shards (shard.tar/KEY.jpg -> OUTPUT/shard.tar/KEY.jpg.roundtrip.png)
    and runs in many processes under torchrun or with --shard I/N; rank 0 prints the table of all.

    Comparing models: give --model several times (--model A --model B ...). Each image is read once
    and round-tripped by every model, each exactly as a run with that model alone would (the same
    numbers); one picture per image, a.png -> a.png.compare.png: original | each model's
    reconstruction, labelled with the model's name, PSNR, SSIM and ΔE00 (no error maps); one table,
    a column per model: mean PSNR, SSIM, ΔE00, seconds of compute per image, then each image's
    PSNR; OUTPUT/compare.html, the gallery of the comparison (a one-model run's are
    a.png.roundtrip.png and index.html, so the two never meet); a re-run keeps a comparison picture
    only when it compares the same models in the same order. The models are loaded together before
    the first image: one that cannot be loaded stops the run with its one-line error, before
    anything is written; a model named twice (or the same weights twice) is a usage error. Comparing runs in one process: --shard,
    --manifest, --from-manifest and torchrun are refused with several models.
    """
)


@app.command(
    help=HELP,
    epilog=epilog(
        "vqcli roundtrip sample_images -o roundtrip",
        "vqcli roundtrip photos/ -o check --model default-vq --json",
        "vqcli roundtrip photos/ -o compare --model default --model default-vq",
        "torchrun --nproc_per_node=4 -m vqcli roundtrip photos/ -o check --json",
    ),
)
@handle_errors
def roundtrip(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the side-by-side pictures.")],
    inputs: Annotated[Optional[list[Path]], typer.Argument(metavar="INPUT...", help="Image files, folders and tar shards of images.", show_default=False)] = None,
    model: Annotated[
        Optional[list[str]],
        typer.Option("--model", "-m", metavar="MODEL", help=MODEL_HELP + " Default: 'default'. Several: compare them (above).", show_default=False),
    ] = None,
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
    gallery: Annotated[bool, typer.Option("--gallery/--no-gallery", help="Write OUTPUT/index.html (comparing models: OUTPUT/compare.html): every picture, PSNR, SSIM and ΔE00, sortable, original or each reconstruction alone.")] = True,
    as_json: JsonOpt = False,
) -> None:
    specs = model or ["default"]
    if len(specs) > 1:
        if shard is not None or manifest is not None or from_manifest is not None:
            raise UsageError(
                "comparing models (--model given more than once) runs in one process: "
                "--shard, --manifest and --from-manifest are for one model at a time"
            )
        return _compare(
            specs, output, inputs or [], device=device, dtype=dtype, preset=preset, max_pixels=max_pixels,
            overwrite=overwrite, quiet=quiet, progress=progress, gallery=gallery, as_json=as_json,
        )
    model = specs[0]
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
            from vqcli.pipeline.gallery import NAME, write_gallery

            write_gallery_reported(output / NAME, lambda: write_gallery(output, images), quiet)
        if images and not as_json and not quiet and scale.main:
            out_console.print(quality_table(images, mean))


def _compare(
    specs: list[str], output: Path, inputs: list[Path], *, device, dtype, preset, max_pixels, overwrite, quiet, progress, gallery, as_json
) -> None:
    """``--model A --model B ...``: every model over the same images, one table, one gallery."""
    from vqcli.checkpoints.load import model_ref, resolve_model
    from vqcli.pipeline.compare import Contender, compare_files, compare_name
    from vqcli.pipeline.results import DONE
    from vqcli.pipeline.selection import count_selected, image_source

    names = _model_names(specs, [model_ref(s) for s in specs])
    scale = Scale(inputs, output)
    if scale.ctx.active:
        raise UsageError("comparing models (--model given more than once) runs in one process, not under torchrun")
    torch_device, torch_dtype = setup_device(device, dtype)
    torch_device = scale.start(torch_device)
    contenders: list[Contender] = []
    entries: list[dict] = []
    for spec, name in zip(specs, names):
        ae = resolve_model(spec, device=torch_device, dtype=torch_dtype, preset=preset)
        same = next((e for e in entries if e["sha256"] == ae.identity()), None)
        if same is not None:
            raise UsageError(f"--model {spec}: the same weights as --model {same['spec']}; compare different models")
        contenders.append(Contender(name, ae, settle_dtype(ae, torch_device, torch_dtype)))
        entries.append({"spec": spec, "name": name, "sha256": ae.identity(), "kind": ae.config.kind})
    models = [
        {**{k: e[k] for k in ("name", "sha256", "kind")}, "dtype": dtype_name(c.dtype), "mean": {}, "seconds_per_image": None, "images": []}
        for e, c in zip(entries, contenders)
    ]
    seconds = [0.0] * len(models)
    source = image_source(inputs, output, scale.selection(), name=compare_name)
    report = scale.report(
        "roundtrip",
        verb="round-tripped",
        count=lambda: count_selected(source, scale.selection(), 1),
        quiet=quiet,
        progress=progress,
        left_out=left_out_of(inputs, output, "an image or a tar shard"),
        as_json=as_json,
        extra={"output": str(output), "device": str(torch_device), "models": models},
    )

    def measured(results):
        for r in results:
            if r.status == DONE:
                for k, (m, s) in enumerate(zip(models, r.info["models"])):
                    size = {"width": r.info["width"], "height": r.info["height"]}
                    m["images"].append({"path": str(r.input), **scores(s), "picture": str(r.output), **size})
                    seconds[k] += s["seconds"]
                    m["seconds_per_image"] = round(seconds[k] / len(m["images"]), 4)
                    fill_mean(m["images"], m["mean"])
            yield r

    results = compare_files(inputs, output, contenders, overwrite=overwrite, max_pixels=max_pixels or None)
    try:
        run(report, measured(results), scale)
    finally:
        if models[0]["images"] and gallery:
            from vqcli.pipeline.gallery import COMPARE_NAME, write_comparison

            rows = [
                {**{k: image[k] for k in ("path", "picture", "width", "height")}, "scores": [m["images"][i] for m in models]}
                for i, image in enumerate(models[0]["images"])
            ]
            write_gallery_reported(output / COMPARE_NAME, lambda: write_comparison(output, rows, names), quiet)
        if models[0]["images"] and not as_json and not quiet:
            out_console.print(comparison_table(models))


def _model_names(specs: list[str], refs: list) -> list[str]:
    """Each model's name as shown (the spec as given where two files share a name); a model named
    twice is refused."""
    for i, (spec, ref) in enumerate(zip(specs, refs)):
        for other, other_ref in zip(specs[:i], refs[:i]):
            if spec == other or (not ref.embedded and not other_ref.embedded and _same_file(ref.path, other_ref.path)):
                raise UsageError(f"--model {spec} is given twice (as {other}); compare different models")
    names = [ref.name for ref in refs]
    return [spec if names.count(name) > 1 else name for spec, name in zip(specs, names)]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False
