"""``vqcli features`` writes OUTPUT/index.html: the input, the overview, every layer's picture and
numbers (equal to ``--json``'s), relative links only, everything escaped; ``--no-gallery`` writes
none; a file of someone else's named index.html is left alone."""

from __future__ import annotations

import base64
import html.parser
import io
import json
import shutil
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vqcli import AutoEncoder, AutoEncoderConfig
from vqcli.checkpoints.native import save_native
from vqcli.cli import app
from vqcli.pipeline.features_gallery import preview_uri

runner = CliRunner()
NAME = 'a <b> & "c" \'d\' ü\x1b.png'  # markup, quotes, non-ASCII and a control character


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "kl.safetensors"
    save_native(AutoEncoder(AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)), path)
    return path


@pytest.fixture
def image(tmp_path) -> Path:
    rng = np.random.default_rng(3)
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / NAME
    Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(path, format="PNG")
    return path


class Page(html.parser.HTMLParser):
    """The page as the tests read it: every <img> (its src and the <section> it is in), every
    table row's cells (text and data-v), the title and the figure captions."""

    def __init__(self, text: str):
        super().__init__()
        self.images: list[tuple[str, str | None]] = []
        self.rows: list[list[tuple[str, str | None]]] = []
        self.captions: list[str] = []
        self.title = ""
        self._section: str | None = None
        self._into: list | None = None
        self._in_title = self._in_caption = False
        self.feed(text)
        self.close()
        self.rows = [row for row in self.rows if row]  # (the header's row has no <td>)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self._section = a.get("id")
        elif tag == "img":
            self.images.append((a["src"], self._section))
        elif tag == "tr" and self._section == "table":
            self.rows.append([])
        elif tag == "td":
            self.rows[-1].append(["", a.get("data-v")])
        elif tag == "title":
            self._in_title = True
        elif tag == "figcaption":
            self.captions.append("")
            self._in_caption = True

    def handle_endtag(self, tag):
        if tag == "section":
            self._section = None
        self._in_title = self._in_title and tag != "title"
        self._in_caption = self._in_caption and tag != "figcaption"

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        if self._in_caption:
            self.captions[-1] += data
        if self.rows and self.rows[-1] and self._section == "table" and self.lasttag in ("td", "a"):
            self.rows[-1][-1][0] += data


def _run(*args: object):
    return runner.invoke(app, ["features", *map(str, args)])


def test_gallery_links_every_layer_picture_and_shows_the_json_numbers(tmp_path, model_path, image):
    out = tmp_path / "f & <out>"
    r = _run(image, "-o", out, "--model", model_path, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["gallery"] == str(out / "index.html")
    moved = Path(shutil.move(str(out), str(tmp_path / "elsewhere")))  # relative links: it opens from anywhere
    text = (moved / "index.html").read_text(encoding="utf-8")
    assert "<b>" not in text and "\x1b" not in text
    page = Page(text)

    # every picture the run wrote is linked, by a relative path that exists; nothing else is
    linked = {}
    for src, section in page.images:
        if src.startswith("data:"):
            continue
        assert not src.startswith(("/", "http", "file:")) and ".." not in src, src
        assert (moved / unquote(src)).is_file(), src
        linked[unquote(src)] = section
    on_disk = {p.relative_to(moved).as_posix() for p in moved.rglob("*.png")}
    assert set(linked) == on_disk and "overview.png" in on_disk and len(on_disk) == len(summary["layers"]) + 1
    for row in summary["layers"]:  # each layer's picture in its part's section
        assert linked[f"layers/{row['layer']}.png"] == row["layer"].split(".")[0]

    # the input, embedded, pixel for pixel (it is small enough to be shown whole)
    (uri, section), = [(s, sec) for s, sec in page.images if s.startswith("data:")]
    assert section == "input" and uri.startswith("data:image/png;base64,")
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))
    assert np.array_equal(shown, np.asarray(Image.open(image).convert("RGB")))

    # the table: a row per layer, in execution order, numbers equal to --json's (full precision)
    assert len(page.rows) == len(summary["layers"])
    for i, (cells, row) in enumerate(zip(page.rows, summary["layers"])):
        (name, _), (shape, _), *numbers = cells
        assert name == row["layer"] and shape == "x".join(map(str, row["shape"]))
        values = [float(v) for _, v in numbers]
        assert values == [i, *row["shape"], row["mean"], row["std"], row["min"], row["max"]]

    # names shown as they are (markup and quotes escaped, the control character as an escape)
    assert page.title == f"vqcli features: {NAME}".replace("\x1b", "\\x1b")
    assert page.captions[0] == f"{NAME}: 28x20".replace("\x1b", "\\x1b")


def test_no_gallery_writes_none_and_someone_elses_page_is_kept(tmp_path, model_path, image):
    base = ["--model", model_path, "--device", "cpu"]
    r = _run(image, "-o", tmp_path / "none", *base, "--no-gallery", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["gallery"] is None
    assert not (tmp_path / "none" / "index.html").exists() and (tmp_path / "none" / "overview.png").is_file()

    # a run again into the same folder without a gallery removes vqcli's page of the earlier run
    out = tmp_path / "again"
    assert _run(image, "-o", out, *base).exit_code == 0 and (out / "index.html").is_file()
    r = _run(image, "-o", out, *base, "--overwrite", "--no-gallery")
    assert r.exit_code == 0, r.output
    assert not (out / "index.html").exists()

    # someone else's index.html: kept, with or without --gallery, and the run goes on
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "index.html").write_text("mine")
    r = _run(image, "-o", theirs, *base)
    assert r.exit_code == 0, r.output
    assert (theirs / "index.html").read_text() == "mine" and (theirs / "features.safetensors").is_file()
    assert "index.html: not written, a file of someone else's is there" in r.stderr
    r = _run(image, "-o", theirs, *base, "--overwrite", "--no-gallery")
    assert r.exit_code == 0, r.output
    assert (theirs / "index.html").read_text() == "mine"


def test_a_large_input_is_embedded_scaled_down():
    rgb = np.random.default_rng(0).random((300, 700, 3), dtype=np.float32)
    uri, size = preview_uri(rgb, 512)
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert size == image.size == (512, 219)
