"""One self-contained ``index.html`` for a ``features`` run's output folder: the input image, the
overview of all layers, a table of every layer's shape and statistics sortable by any numeric
column, and each layer's picture with its numbers, in an encoder and a decoder section.

The input is embedded in the page (a PNG, at most ``PREVIEW`` pixels on its longer side) because
it usually lives outside the folder; the layer pictures are linked by paths relative to the page.
So the folder can be moved, copied or served as it is; nothing comes from the network.

The pictures load eagerly: a features page has one picture per layer (tens, not thousands), so
the browser fetches them all at once, as the user scrolls or not.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from vqcli.pipeline.gallery import (
    NAME,
    is_ours,
    page_head,
    relative_src,
    text,
    write_page,
)

PREVIEW = 512  # the embedded input's longer side at most, in pixels

# (header, the row's key, shown as): the table's numeric columns, each sortable
_COLUMNS = (
    ("#", "order", "{:d}"),
    ("channels", "channels", "{:d}"),
    ("height", "height", "{:d}"),
    ("width", "width", "{:d}"),
    ("mean", "mean", "{:.4g}"),
    ("std", "std", "{:.4g}"),
    ("min", "min", "{:.4g}"),
    ("max", "max", "{:.4g}"),
)

_STYLE = """
body { font-family: sans-serif; margin: 1em; }
table { border-collapse: collapse; margin-bottom: 1em; }
th, td { padding: 2px 8px; text-align: right; border-bottom: 1px solid #ddd; }
th { background: #eee; } th.sort { cursor: pointer; }
td.name, th.name { text-align: left; }
figure { margin: 1em 0; } figcaption { font-weight: bold; margin-bottom: 4px; }
img { max-width: 100%; image-rendering: pixelated; }
"""

_SCRIPT = """
function sortBy(col) {
  const body = document.querySelector('#layers tbody');
  const rows = Array.from(body.rows);
  const dir = body.dataset.col == col && body.dataset.dir == 'down' ? 1 : -1;
  rows.sort((a, b) => dir * (parseFloat(a.cells[col].dataset.v) - parseFloat(b.cells[col].dataset.v)));
  rows.forEach(r => body.appendChild(r));
  body.dataset.col = col; body.dataset.dir = dir == -1 ? 'down' : 'up';
}
"""


def preview_uri(rgb: np.ndarray, size: int = PREVIEW) -> tuple[str, tuple[int, int]]:
    """An (H, W, 3) [0, 1] image as a ``data:`` URI of a PNG whose longer side is at most
    ``size``, and that PNG's (width, height)."""
    image = Image.fromarray(np.clip(np.rint(np.asarray(rgb, dtype=np.float32) * 255), 0, 255).astype(np.uint8))
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), image.size


def features_gallery_html(
    rows: list[dict], folder: Path, *, image: str | os.PathLike, rgb: np.ndarray, overview: str | os.PathLike, model: str
) -> str:
    """The page for ``rows`` (each as ``features --json`` has it: ``layer``, ``shape``, ``mean``,
    ``std``, ``min``, ``max``, ``png``), to be written in ``folder``; ``image`` the input's path
    (shown as its name), ``rgb`` its pixels as the model saw them, ``overview`` overview.png's path."""
    height, width = rgb.shape[:2]
    name = text(Path(image).name)
    uri, (shown_w, shown_h) = preview_uri(rgb)
    scale = "" if (shown_w, shown_h) == (width, height) else f", shown at {shown_w}x{shown_h}"
    table, sections = [], {"encoder": [], "decoder": []}
    for i, row in enumerate(rows):
        channels, h, w = (list(row["shape"]) + [1, 1, 1])[:3]
        values = {"order": i, "channels": channels, "height": h, "width": w, **row}
        layer = text(row["layer"])
        cells = "".join(f'<td data-v="{values[key]!r}">{text(fmt.format(values[key]))}</td>' for _, key, fmt in _COLUMNS)
        table.append(
            f'<tr><td class="name"><a href="#layer{i}">{layer}</a></td>'
            f'<td class="name">{text("x".join(map(str, row["shape"])))}</td>{cells}</tr>'
        )
        stats = ", ".join(f"{key} {values[key]:.4g}" for key in ("mean", "std", "min", "max"))
        part = "decoder" if row["layer"].startswith("decoder.") else "encoder"
        sections[part].append(
            f'<figure id="layer{i}"><figcaption>{layer}: shape {text("x".join(map(str, row["shape"])))}, {text(stats)}'
            f'</figcaption><img src="{relative_src(row["png"], folder)}" alt="{layer}"></figure>'
        )
    headers = "".join(f'<th class="sort" onclick="sortBy({col})">{header} &#x21C5;</th>' for col, (header, _, _) in enumerate(_COLUMNS, 2))
    parts = "\n".join(
        f'<section id="{part}"><h2>{part.capitalize()} ({len(figures)} layers)</h2>\n' + "\n".join(figures) + "</section>"
        for part, figures in sections.items()
        if figures
    )
    title = f"vqcli features: {Path(image).name}"
    return f"""{page_head(title, _STYLE, _SCRIPT)}
<body><h1>{text(title)}</h1>
<p>Model {text(model)}; {len(rows)} layers.</p>
<section id="input"><h2>Input</h2><figure><figcaption>{name}: {width}x{height}{scale}</figcaption>
<img src="{uri}" alt="{name}"></figure></section>
<section id="overview"><h2>All layers</h2><figure><figcaption>mean |activation| over channels, in execution order</figcaption>
<img src="{relative_src(overview, folder)}" alt="overview"></figure></section>
<section id="table"><h2>Layers</h2><table id="layers"><thead><tr><th class="name">layer</th><th class="name">shape</th>{headers}</tr></thead><tbody>
{chr(10).join(table)}
</tbody></table></section>
{parts}
</body></html>
"""


def write_features_gallery(folder: Path, rows: list[dict], **page) -> Path | None:
    """Write ``folder/index.html`` (replacing only a page of vqcli's); None when a file of someone
    else's is there. ``page``: as for ``features_gallery_html``."""
    return write_page(folder, features_gallery_html(rows, Path(folder), **page))


def drop_gallery(folder: Path) -> bool:
    """Remove ``folder/index.html`` when it is a page of vqcli's (it would describe an earlier run
    than the files beside it); True when one was removed. A file of someone else's is kept."""
    path = Path(folder) / NAME
    if os.path.isfile(path) and not os.path.islink(path) and is_ours(path):
        os.remove(path)
        return True
    return False
