"""``vqcli roundtrip``: encode and decode in one go and report the quality."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..images import DEFAULT_MAX_PIXELS
from ._app import app, handle_errors, out_console
from .common import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MaxPixelsOpt,
    ModelOpt,
    OverwriteOpt,
    PresetOpt,
    QuietOpt,
    RunReport,
    dtype_name,
    epilog,
    help_text,
    run_report,
    settle_dtype,
    setup_device,
)

HELP = help_text(
    """
    Encode and decode images in one go and measure the reconstruction.

    For each image: PSNR (dB) and SSIM of the reconstruction against the original, both as 8-bit
    RGB, and a side-by-side picture under OUTPUT (a.png -> a.png.roundtrip.png): original |
    reconstruction | error map (absolute difference, 4x). A table of the metrics and their mean
    follows the run; with --json they are in the summary object.
    """
)


@app.command(
    help=HELP,
    epilog=epilog(
        "vqcli roundtrip sample_images -o roundtrip",
        "vqcli roundtrip photos/ -o check --model default-vq --json",
    ),
)
@handle_errors
def roundtrip(
    inputs: Annotated[list[Path], typer.Argument(metavar="INPUT...", help="Image files and folders.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the side-by-side pictures.")],
    model: ModelOpt = "default",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    preset: PresetOpt = None,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    from ..images import is_image_path
    from ..models import model_ref, resolve_model
    from ..pipeline import DONE, check_inputs, count_inputs
    from ..roundtrip import roundtrip_files

    check_inputs(inputs, output)
    torch_device, torch_dtype = setup_device(device, dtype)
    ae = resolve_model(model, device=torch_device, dtype=torch_dtype, preset=preset)
    torch_dtype = settle_dtype(ae, torch_device, torch_dtype)
    ref = model_ref(model)
    images: list[dict] = []
    mean: dict = {}
    report = RunReport(
        "roundtrip",
        verb="round-tripped",
        count=lambda: count_inputs(inputs, is_image_path, exclude=output),
        quiet=quiet,
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
                images.append({"path": str(r.input), "psnr": _round(r.info["psnr"]), "ssim": round(r.info["ssim"], 4)})
                mean["psnr"] = _round(sum(i["psnr"] for i in images) / len(images))
                mean["ssim"] = round(sum(i["ssim"] for i in images) / len(images), 4)
            yield r

    results = roundtrip_files(inputs, output, ae, dtype=torch_dtype, overwrite=overwrite, max_pixels=max_pixels or None)
    try:
        run_report(report, measured(results))
    finally:
        if images and not as_json and not quiet:
            out_console.print(_table(images, mean))


def _round(value: float) -> float:
    return value if math.isinf(value) else round(value, 2)


def _table(images: list[dict], mean: dict) -> Table:
    table = Table(title="reconstruction quality")
    table.add_column("image", overflow="fold")
    table.add_column("PSNR (dB)", justify="right")
    table.add_column("SSIM", justify="right")
    for i in images:
        table.add_row(i["path"], f"{i['psnr']:.2f}", f"{i['ssim']:.4f}")
    table.add_section()
    table.add_row("mean", f"{mean['psnr']:.2f}", f"{mean['ssim']:.4f}", style="bold")
    return table
