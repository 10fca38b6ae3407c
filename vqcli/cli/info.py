"""``vqcli info``: what a file is, its model, config, shapes, dtypes and metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from vqcli.cli._app import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    app,
    err_console,
    handle_errors,
    out_console,
    print_json,
    shown,
)
from vqcli.cli.common import JsonOpt, epilog, help_text

HELP = help_text(
    """
    Describe latent files, weights files and other safetensors files; an embedded model's name
    (default, default-vq) describes that model.

    For a latent file: the image it came from (original and padded size), the model (name,
    SHA-256 of its weights, config), scale and shift and whether they were applied, the tensor's
    shape and dtype and a few statistics. For a weights file: the model's config, identity,
    parameter count and dtypes. Other checkpoint formats are read when the checkpoint readers are
    installed; any other safetensors file gets its tensors and metadata listed.
    """
)

# The fields shown, in order, for people; --json has everything.
_LATENT_ROWS = ("type", "source", "frame", "size", "padded", "model", "model_sha256", "kind", "representation", "scaled",
                "scale_factor", "shift_factor", "seed", "tensor", "stats", "config")
_MODEL_ROWS = ("type", "format", "ignored_keys", "model", "config", "downsampling", "latent_channels", "parameters", "tensors", "dtypes")


@app.command(
    help=HELP,
    epilog=epilog(
        "vqcli info latents/astronaut.png.safetensors",
        "vqcli info default --json",
        "vqcli info latents/*.safetensors",
    ),
)
@handle_errors
def info(
    files: Annotated[list[Path], typer.Argument(metavar="FILE...", help="Files to describe, or embedded model names.", show_default=False)],
    as_json: JsonOpt = False,
) -> None:
    from vqcli.checkpoints.registry import embedded_path, is_embedded
    from vqcli.errors import FileError
    from vqcli.pipeline.fileinfo import describe

    described, failures = [], []
    for path in files:
        if is_embedded(str(path)) and not path.exists():  # `vqcli info default`: the embedded model
            path = embedded_path(str(path))
        try:
            described.append(describe(path))
        except FileError as e:
            failures.append({"path": str(path), "reason": e.reason})
            err_console.print(shown(f"{path}: {e.reason}"), highlight=False, soft_wrap=True, style="red")
    if as_json:
        print_json("info", not failures, {"files": described, "failures": failures})
    else:
        for d in described:
            out_console.print(_table(d))
    raise typer.Exit(EXIT_SOME_FAILED if failures else EXIT_OK)


def _table(d: dict) -> Table:
    table = Table(title=shown(d["file"]), show_header=False, title_justify="left")
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    if d["type"] == "latent":
        view = dict(d)
        view["size"] = f"{d['width']}x{d['height']}"
        view["padded"] = f"{d['padded_width']}x{d['padded_height']} (padding right {d['padding'][0]}, bottom {d['padding'][1]})"
        view["model"] = f"{d['model']} ({'embedded' if d['model_embedded'] else 'weights file'})"
        view["tensor"] = f"latent {tuple(d['tensor']['shape'])} {d['tensor']['dtype']}"
        view["config"] = _short_config(d["config"])
        if "frame" in d:  # one frame of an animated image (encode --all-frames)
            shown_ms = f", shown {d['frame_duration_ms']} ms" if "frame_duration_ms" in d else ""
            view["frame"] = f"{d['frame']} of {d['frames']} (from 0){shown_ms}"
        rows = _LATENT_ROWS
    elif d["type"] in ("weights", "checkpoint"):
        view = dict(d)
        view["model"] = f"{d['model']['name'] or '(unnamed)'} {d['model']['kind']}, sha256 {d['model']['sha256']}"
        view["config"] = _short_config(d["config"])
        rows = _MODEL_ROWS
    else:
        view = dict(d)
        if d.get("tensor_list"):
            view["tensor_list"] = [f"{k} {tuple(v['shape'] or ())} {v['dtype']}" for k, v in d["tensor_list"].items()]
            view["tensor_list"] += ["..."] if d.get("tensor_list_truncated") else []
        rows = ("type", "note", "metadata", "tensors", "dtypes", "tensor_list")
    for key in rows:
        if view.get(key) is None:
            continue
        value = view[key]
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items())
        lines = value if isinstance(value, list) else [value]  # (each line escaped on its own)
        table.add_row(key, "\n".join(shown(line) for line in lines))
    return table


def _short_config(config: dict) -> str:
    keys = ("kind", "ch", "ch_mult", "num_res_blocks", "z_channels", "embed_dim", "n_embed", "attn_resolutions",
            "scale_factor", "shift_factor")
    parts = [f"{k}={config[k]}" for k in keys if k in config and not (k == "n_embed" and config["kind"] == "kl")]
    if config.get("mid_attention") is False:
        parts.append("mid_attention=False")
    return ", ".join(parts)
