"""``vqcli convert`` (any supported checkpoint to vqcli's file or a diffusers folder) and ``vqcli models``."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from vqcli.cli._app import (
    app,
    err_console,
    handle_errors,
    out_console,
    print_json,
    shown,
)


class Target(str, Enum):
    vqcli = "vqcli"
    diffusers = "diffusers"


class DType(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


@app.command(
    epilog="Examples: vqcli convert sdxl_vae.safetensors -o sdxl.safetensors --preset sdxl; "
    "vqcli convert vqgan.ckpt -o vqgan-diffusers --to diffusers"
)
@handle_errors
def convert(
    src: Path = typer.Argument(..., help="Checkpoint file or diffusers folder (any format vqcli reads)."),
    output: Path = typer.Option(..., "-o", "--output", help="Destination file (vqcli) or folder (diffusers)."),
    to: Optional[Target] = typer.Option(
        None, "--to", help="Output format (default: vqcli if OUTPUT ends in .safetensors, else diffusers)."
    ),
    preset: Optional[str] = typer.Option(None, help="Model family for the latent factors (see vqcli models)."),
    scale_factor: Optional[float] = typer.Option(None, "--scale-factor", help="Override the latent scale factor."),
    shift_factor: Optional[float] = typer.Option(None, "--shift-factor", help="Override the latent shift factor."),
    dtype: Optional[DType] = typer.Option(None, "--dtype", help="Convert the weights to this dtype (default: keep the file's)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Convert a checkpoint to vqcli's own .safetensors (config in its metadata) or a diffusers folder.

    The weights are copied exactly; only names and attention-weight shapes change between layouts.
    """
    from vqcli.checkpoints.convert import convert_checkpoint
    from vqcli.model.config import describe

    model, written = convert_checkpoint(
        src,
        output,
        to=to.value if to else None,
        preset=preset,
        scale_factor=scale_factor,
        shift_factor=shift_factor,
        dtype=dtype.value if dtype else None,
        overwrite=overwrite,
    )
    c = model.config
    if as_json:
        summary = {
            "source": str(src),
            "output": str(output),
            "format": written,
            "identity": model.identity(),
            "config": c.to_dict(),
        }
        print_json("convert", True, summary)
    else:
        err_console.print(
            f"wrote {shown(output)} ({written}): {shown(describe(c))}, scale {c.scale_factor:g}, shift {c.shift_factor:g}",
            highlight=False,
            soft_wrap=True,
        )


@app.command()
@handle_errors
def models(as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout.")) -> None:
    """List the model presets (latent conventions of known families) and the embedded models."""
    from vqcli.checkpoints.registry import EMBEDDED, PRESETS, embedded_config
    from vqcli.errors import VqcliError
    from vqcli.model.config import describe

    presets = [
        {
            "name": p.name,
            "title": p.title,
            "scale_factor": p.scale_factor,
            "shift_factor": p.shift_factor,
            "architecture": describe(p.architecture),
        }
        for p in PRESETS.values()
    ]
    embedded = []
    for m in EMBEDDED.values():
        entry = {"name": m.name, "description": m.description, "path": str(m.path), "installed": m.installed}
        try:
            config = embedded_config(m)
        except VqcliError as e:
            entry["error"] = str(e)
            config = None
        if config is not None:
            entry["architecture"] = describe(config)
            entry["scale_factor"] = config.scale_factor
            entry["shift_factor"] = config.shift_factor
        embedded.append(entry)

    if as_json:
        print_json("models", True, {"presets": presets, "embedded": embedded})
        return
    table = Table(title="Presets (use with --preset)", title_justify="left")
    for column in ("name", "family", "scale", "shift", "architecture"):
        table.add_column(column)
    for p in presets:
        table.add_row(p["name"], p["title"], f"{p['scale_factor']:g}", f"{p['shift_factor']:g}", p["architecture"])
    out_console.print(table)
    table = Table(title="Embedded models (use with --model NAME)", title_justify="left")
    for column in ("name", "status", "description"):
        table.add_column(column)
    for e in embedded:
        status = "error: " + e["error"] if "error" in e else ("installed" if e["installed"] else "not installed")
        about = e["description"] + (f" ({e['architecture']})" if "architecture" in e else "")
        table.add_row(shown(e["name"]), shown(status), shown(about))
    out_console.print(table)
    if not all(e["installed"] for e in embedded):
        err_console.print("Embedded models that are not installed can be trained with: vqcli train --preset NAME")

