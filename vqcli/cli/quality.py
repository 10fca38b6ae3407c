"""The numbers of ``vqcli roundtrip`` as reported: each image's scores rounded for the JSON, their
means, and the tables (one model; several models compared, a column each)."""

from __future__ import annotations

import math

from rich.table import Table

from vqcli.cli._app import shown


def scores(info: dict) -> dict:
    """An image's reported scores from the pipeline's measure (``psnr``, ``ssim``, ``ciede2000``, ``bias``)."""
    return {
        "psnr": _round(info["psnr"]),
        "ssim": round(info["ssim"], 4),
        "ciede2000": round(info["ciede2000"], 4),
        "bias": [round(b, 3) for b in info["bias"]],
    }


def fill_mean(images: list[dict], mean: dict) -> None:
    """``mean`` (in place): the mean of each score over ``images`` (the bias channel by channel);
    exactly summed (``math.fsum``), so the order of the images (one process or several) does not
    change the last digit."""
    if not images:
        return
    n = len(images)
    mean["psnr"] = _round(math.fsum(i["psnr"] for i in images) / n)
    mean["ssim"] = round(math.fsum(i["ssim"] for i in images) / n, 4)
    mean["ciede2000"] = round(math.fsum(i["ciede2000"] for i in images) / n, 4)
    mean["bias"] = [round(math.fsum(i["bias"][c] for i in images) / n, 3) for c in range(3)]


def score_cells(s: dict) -> tuple[str, str, str]:
    """PSNR, SSIM and ΔE00 as the tables show them."""
    return f"{s['psnr']:.2f}", f"{s['ssim']:.4f}", f"{s['ciede2000']:.2f}"


def quality_table(images: list[dict], mean: dict) -> Table:
    """One model: a row per image and the mean."""
    table = Table(title="reconstruction quality")
    table.add_column("image", overflow="fold")
    for name in ("PSNR (dB)", "SSIM", "ΔE00"):
        table.add_column(name, justify="right")
    for i in images:
        table.add_row(shown(i["path"]), *score_cells(i))
    table.add_section()
    table.add_row("mean", *score_cells(mean), style="bold")
    return table


def comparison_table(models: list[dict]) -> Table:
    """Several models (each: ``name``, ``mean``, ``seconds_per_image``, ``images`` in the same
    order): a column per model; rows the means, the seconds per image, then each image's PSNR."""
    table = Table(title="models compared (PSNR, SSIM, ΔE00: means over the images)")
    table.add_column("", overflow="fold")
    for m in models:
        table.add_column(shown(m["name"]), justify="right", overflow="fold")
    means = [score_cells(m["mean"]) if m["mean"] else ("-", "-", "-") for m in models]
    for row, label in enumerate(("PSNR (dB)", "SSIM", "ΔE00")):
        table.add_row(label, *(cells[row] for cells in means), style="bold")
    table.add_row("s / image", *(f"{m['seconds_per_image']:.3f}" if m["images"] else "-" for m in models))
    if models and models[0]["images"]:
        table.add_section()
        for index, image in enumerate(models[0]["images"]):
            label = f"{shown(image['path'])} PSNR"
            table.add_row(label, *(f"{m['images'][index]['psnr']:.2f}" for m in models))
    return table


def _round(value: float) -> float:
    return value if math.isinf(value) else round(value, 2)
