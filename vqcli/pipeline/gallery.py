"""One self-contained ``index.html`` for a roundtrip's output folder: every image's labelled
side-by-side picture, its PSNR, SSIM and mean CIEDE2000 colour difference (ΔE00), a table
sortable by each, and a toggle that shows the original or the reconstruction alone, full size.
A comparison of models gets ``compare.html`` (``COMPARE_NAME``): the same with the comparison
pictures, a group of columns per model, and a toggle between the original and each model's
reconstruction.

The page links the pictures by paths relative to itself (no absolute path, no network, no
script from elsewhere), so the folder can be moved, copied or served as it is.
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from urllib.parse import quote

from vqcli.io.atomic import atomic_path
from vqcli.pipeline.pictures import CAPTION, GAP

GENERATOR = '<meta name="generator" content="vqcli gallery">'
NAME = "index.html"
COMPARE_NAME = "compare.html"

_STYLE = """
body { font-family: sans-serif; margin: 1em; }
table { border-collapse: collapse; margin-bottom: 1em; }
th, td { padding: 2px 8px; text-align: right; border-bottom: 1px solid #ddd; }
th { cursor: pointer; background: #eee; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; } figcaption { font-weight: bold; }
.view { overflow: hidden; display: none; } body.single .view { display: block; }
body.single .both { display: none; }
"""

_SCRIPT = """
function sortBy(col) {
  const body = document.querySelector('#scores tbody');
  const rows = Array.from(body.rows);
  const dir = body.dataset.col == col && body.dataset.dir == 'down' ? 1 : -1;
  rows.sort((a, b) => dir * (parseFloat(a.cells[col].dataset.v) - parseFloat(b.cells[col].dataset.v)));
  rows.forEach(r => body.appendChild(r));
  const figures = document.getElementById('figures');
  rows.forEach(r => figures.appendChild(document.getElementById(r.dataset.fig)));
  body.dataset.col = col; body.dataset.dir = dir == -1 ? 'down' : 'up';
}
function show(which) {  // 'both', 'original', 'reconstruction', or the index of a picture's panel
  document.body.classList.toggle('single', which != 'both');
  const panel = which == 'reconstruction' ? 1 : (which == 'both' || which == 'original' ? 0 : Number(which));
  document.querySelectorAll('.view img').forEach(img => {
    img.style.marginLeft = '-' + panel * img.dataset.shift + 'px';
  });
}
"""


def is_ours(path: Path) -> bool:
    """True when ``path`` is a gallery vqcli wrote (its ``generator`` tag)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return GENERATOR in f.read(4096)
    except OSError:
        return False


def text(value: object) -> str:
    """``value`` as HTML text or attribute value: markup escaped, quotes too, and control
    characters shown as escapes (a file name may hold any of them)."""
    shown = "".join(c if c.isprintable() or c == " " else ascii(c)[1:-1] for c in str(value))
    return html.escape(shown, quote=True)


def relative_src(target: str | os.PathLike, folder: Path) -> str:
    """An ``src``/``href`` for ``target`` relative to a page in ``folder``, URL-quoted and escaped."""
    return html.escape(quote(Path(os.path.relpath(target, folder)).as_posix()), quote=True)


def page_head(title: str, style: str, script: str) -> str:
    """The start of a vqcli page up to ``<body>``: charset, the ``generator`` tag, title, inline style and script."""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{GENERATOR}\n'
        f"<title>{text(title)}</title><style>{style}</style><script>{script}</script></head>"
    )


def write_page(folder: Path, page: str, name: str = NAME) -> Path | None:
    """Write ``page`` as ``folder/name``, atomically, replacing only a page of vqcli's; None
    (and nothing written) when a file of someone else's is there."""
    path = Path(folder) / name
    exists = os.path.lexists(path)
    if exists and not is_ours(path):
        return None
    with atomic_path(path, overwrite=exists) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    return path


def gallery_html(rows: list[dict], folder: Path, title: str = "vqcli roundtrip") -> str:
    """The page for ``rows`` (each: ``path`` the input, ``picture`` the side-by-side file,
    ``width``, ``height``, ``psnr``, ``ssim``, ``ciede2000``), to be written in ``folder``."""
    table, figures = [], []
    for i, row in enumerate(rows):
        name = text(row["path"])
        src = relative_src(row["picture"], folder)
        psnr = row["psnr"]
        width, height = row["width"], row["height"]
        table.append(
            f'<tr data-fig="f{i}"><td><a href="#f{i}">{name}</a></td>'
            f'<td data-v="{_number(psnr)}">{_text(psnr, 2)}</td><td data-v="{row["ssim"]:.6f}">{row["ssim"]:.4f}</td>'
            f'<td data-v="{row["ciede2000"]:.6f}">{row["ciede2000"]:.2f}</td></tr>'
        )
        figures.append(
            f'<figure id="f{i}"><figcaption>{name}: PSNR {_text(psnr, 2)} dB, SSIM {row["ssim"]:.4f}, ΔE00 {row["ciede2000"]:.2f}</figcaption>'
            f'<img class="both" src="{src}" alt="{name}" loading="lazy">'
            f'<div class="view" style="width:{width}px;height:{height}px">'
            f'<img src="{src}" alt="{name}" data-shift="{width + GAP}" style="margin-top:-{CAPTION}px"></div></figure>'
        )
    return f"""{page_head(title, _STYLE, _SCRIPT)}
<body><h1>{text(title)}</h1>
<p>Show: <label><input type="radio" name="show" checked onclick="show('both')"> side by side</label>
<label><input type="radio" name="show" onclick="show('original')"> original</label>
<label><input type="radio" name="show" onclick="show('reconstruction')"> reconstruction</label></p>
<table id="scores"><thead><tr><th>image</th><th onclick="sortBy(1)">PSNR (dB) &#x21C5;</th>
<th onclick="sortBy(2)">SSIM &#x21C5;</th><th onclick="sortBy(3)">ΔE00 &#x21C5;</th></tr></thead><tbody>
{chr(10).join(table)}
</tbody></table>
<div id="figures">
{chr(10).join(figures)}
</div></body></html>
"""


def write_gallery(folder: Path, rows: list[dict], title: str = "vqcli roundtrip") -> Path | None:
    """Write ``folder/index.html`` (replacing only a gallery of vqcli's); None when a file of
    someone else's is there."""
    return write_page(folder, gallery_html(rows, Path(folder), title))


def comparison_html(rows: list[dict], models: list[str], folder: Path, title: str = "vqcli roundtrip: models compared") -> str:
    """The page of a comparison: ``rows`` (each: ``path``, ``picture`` the comparison picture,
    ``width``, ``height``, ``scores``: a ``psnr``, ``ssim``, ``ciede2000`` dict per model in the
    order of ``models``), to be written in ``folder``."""
    table, figures = [], []
    for i, row in enumerate(rows):
        name = text(row["path"])
        src = relative_src(row["picture"], folder)
        width, height = row["width"], row["height"]
        cells = "".join(
            f'<td data-v="{_number(s["psnr"])}">{_text(s["psnr"], 2)}</td><td data-v="{s["ssim"]:.6f}">{s["ssim"]:.4f}</td>'
            f'<td data-v="{s["ciede2000"]:.6f}">{s["ciede2000"]:.2f}</td>'
            for s in row["scores"]
        )
        table.append(f'<tr data-fig="f{i}"><td><a href="#f{i}">{name}</a></td>{cells}</tr>')
        caption = "; ".join(
            f'{text(m)}: PSNR {_text(s["psnr"], 2)} dB, SSIM {s["ssim"]:.4f}, ΔE00 {s["ciede2000"]:.2f}'
            for m, s in zip(models, row["scores"])
        )
        figures.append(
            f'<figure id="f{i}"><figcaption>{name}: {caption}</figcaption>'
            f'<img class="both" src="{src}" alt="{name}" loading="lazy">'
            f'<div class="view" style="width:{width}px;height:{height}px">'
            f'<img src="{src}" alt="{name}" data-shift="{width + GAP}" style="margin-top:-{CAPTION}px"></div></figure>'
        )
    groups = "".join(f'<th colspan="3">{text(m)}</th>' for m in models)
    heads = "".join(
        f'<th onclick="sortBy({1 + 3 * k + j})">{label} &#x21C5;</th>'
        for k in range(len(models))
        for j, label in enumerate(("PSNR (dB)", "SSIM", "ΔE00"))
    )
    toggles = "".join(
        f'\n<label><input type="radio" name="show" onclick="show({k})"> {text(m)}</label>' for k, m in enumerate(models, start=1)
    )
    return f"""{page_head(title, _STYLE, _SCRIPT)}
<body><h1>{text(title)}</h1>
<p>Show: <label><input type="radio" name="show" checked onclick="show('both')"> side by side</label>
<label><input type="radio" name="show" onclick="show('original')"> original</label>{toggles}</p>
<table id="scores"><thead><tr><th></th>{groups}</tr><tr><th>image</th>{heads}</tr></thead><tbody>
{chr(10).join(table)}
</tbody></table>
<div id="figures">
{chr(10).join(figures)}
</div></body></html>
"""


def write_comparison(folder: Path, rows: list[dict], models: list[str]) -> Path | None:
    """Write ``folder/compare.html`` (replacing only a page of vqcli's); None when a file of
    someone else's is there."""
    return write_page(folder, comparison_html(rows, models, Path(folder)), COMPARE_NAME)


def _number(value: float) -> str:
    return "1e9" if math.isinf(value) else f"{value:.6f}"


def _text(value: float, digits: int) -> str:
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"
