"""``vqcli features``: every layer's feature map of one image, as tensors, pictures and a table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from vqcli.cli._app import app, fail, handle_errors, out_console, print_json, shown
from vqcli.cli.common import (
    DeviceOpt,
    JsonOpt,
    MaxPixelsOpt,
    ModelOpt,
    OverwriteOpt,
    PresetOpt,
    QuietOpt,
    dtype_name,
    epilog,
    help_text,
    settle_dtype,
    setup_device,
    write_gallery_reported,
)
from vqcli.io.images import DEFAULT_MAX_PIXELS

HELP = help_text(
    """
    Show what every layer of the model makes of one image.

    Runs IMAGE through the encoder and the decoder (forward_with_features_output) and writes into
    OUTPUT (default: IMAGE-NAME.features in the current folder):

    features.safetensors: every layer's feature map (C, H, W), keys like encoder.conv_in,
    encoder.down0_block0, decoder.up1_block0 (--save-dtype float16 halves the size);
    layers/KEY.png: the layer's most active channels (largest mean |activation|) as a labelled
    grid; overview.png: all layers side by side; index.html (unless --no-gallery): a page with the
    input, the overview, a table of the layers sortable by any column, and every layer's picture.

    Prints a table of each layer's shape, mean, std, min and max (or JSON with --json).
    """
)


@app.command(
    help=HELP,
    epilog=epilog(
        "vqcli features sample_images/astronaut.png",
        "vqcli features photo.jpg -o feats --layers 'down*' --layers 'mid*' --save-dtype float16",
        "vqcli features photo.jpg --model default-vq --json",
    ),
)
@handle_errors
def features(
    image: Annotated[Path, typer.Argument(metavar="IMAGE", help="The image.", show_default=False)],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Folder for the results.")] = None,
    model: ModelOpt = "default",
    layers: Annotated[
        Optional[list[str]],
        typer.Option("--layers", "-l", help="Only layers matching this glob (repeatable), e.g. 'down*', 'decoder.up1*'."),
    ] = None,
    save_dtype: Annotated[str, typer.Option("--save-dtype", help="Dtype of the saved maps: float32, float16 or bfloat16.")] = "float32",
    dtype: Annotated[str, typer.Option("--dtype", help="Compute precision, as for every command: float32, bfloat16, float16 or auto.")] = "float32",
    channels: Annotated[int, typer.Option("--channels", min=1, help="Channels shown per layer picture.")] = 16,
    gallery: Annotated[bool, typer.Option("--gallery/--no-gallery", help="Write OUTPUT/index.html: the input, the overview, every layer's picture and numbers, sortable.")] = True,
    device: DeviceOpt = "auto",
    preset: PresetOpt = None,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    from vqcli.checkpoints.load import model_ref, resolve_model
    from vqcli.errors import FileError
    from vqcli.io.images import load_image
    from vqcli.io.ownership import check_replaceable
    from vqcli.pipeline.batching import NON_FINITE, finite
    from vqcli.pipeline.features import (
        extract_features,
        layer_grid,
        layer_stats,
        overview,
        save_features,
        save_png,
        select_layers,
    )
    from vqcli.pipeline.features_gallery import drop_gallery, write_features_gallery
    from vqcli.speed.devices import DTYPES

    if save_dtype not in DTYPES:
        raise fail(f"--save-dtype must be one of {', '.join(DTYPES)}, not {save_dtype!r}")
    if not image.exists():
        raise fail(f"{image}: no such file")
    out = output if output is not None else Path(f"{image.name}.features")
    for target in (out / "features.safetensors", out / "overview.png"):
        check_replaceable(target, overwrite=overwrite)
    torch_device, torch_dtype = setup_device(device, dtype)
    ae = resolve_model(model, device=torch_device, dtype=torch_dtype, preset=preset)
    torch_dtype = settle_dtype(ae, torch_device, torch_dtype)
    rgb = load_image(image, max_pixels=max_pixels or None)
    every = extract_features(ae, rgb, dtype=torch_dtype)
    bad = next((key for key, t in every.items() if not finite(t)), None)
    if bad is not None:
        raise FileError(image, f"layer {bad} has {NON_FINITE}")
    maps = select_layers(every, layers or [])
    if not maps:
        raise fail(f"no layer matches {', '.join(layers or [])}")
    for key in maps:  # (checked, all of them, before anything is written)
        check_replaceable(out / "layers" / f"{key}.png", overwrite=overwrite)

    height, width = rgb.shape[:2]
    meta = {"source": image.name, "width": str(width), "height": str(height), "model": model_ref(model).name,
            "model_sha256": ae.identity()}
    save_features(out / "features.safetensors", maps, dtype=DTYPES[save_dtype], metadata=meta, overwrite=True)
    rows = []
    for key, t in maps.items():
        png = out / "layers" / f"{key}.png"
        save_png(layer_grid(key, t, channels=channels), png, overwrite=True)
        rows.append({"layer": key, **layer_stats(t), "png": str(png)})
    save_png(overview(maps), out / "overview.png", overwrite=True)
    page = None
    if gallery:
        page = write_gallery_reported(
            out / "index.html",
            lambda: write_features_gallery(out, rows, image=image, rgb=rgb, overview=out / "overview.png", model=model_ref(model).name),
            quiet or as_json,
        )
    else:
        drop_gallery(out)

    if as_json:
        summary = {
            "image": str(image),
            "width": width,
            "height": height,
            "model": {"name": model_ref(model).name, "sha256": ae.identity(), "kind": ae.config.kind},
            "features": str(out / "features.safetensors"),
            "overview": str(out / "overview.png"),
            "save_dtype": save_dtype,
            "dtype": dtype_name(torch_dtype),
            "gallery": None if page is None else str(page),
            "layers": rows,
        }
        print_json("features", True, summary)
        return
    if quiet:
        return
    table = Table(title=f"{shown(image.name)}: {width}x{height}, {len(rows)} layers -> {shown(out)}")
    for col in ("layer", "shape", "mean", "std", "min", "max"):
        table.add_column(col, justify="left" if col in ("layer", "shape") else "right", no_wrap=True)
    for r in rows:
        table.add_row(shown(r["layer"]), "x".join(map(str, r["shape"])), *(f"{r[k]:.4g}" for k in ("mean", "std", "min", "max")))
    out_console.print(table)
