"""The galleries as a browser shows them: the real index.html of ``roundtrip`` and of ``features``,
opened from a file:// URL in headless Chromium, renders every picture, and its sort and its
original/reconstruction toggle work. Skipped where no Chromium or Chrome is on PATH.

How: a copy of the page, in the same folder (so relative links resolve as for the page), gets a
checking script at its end. After the page is parsed the script goes through every <img>: scrolls
it into view (the roundtrip page loads its side-by-side pictures lazily, as a user scrolls; the
hidden single-view pictures are eager, so they load although hidden), waits for its load or error
event, and records whether it decoded (complete, naturalWidth > 0) and its natural size. Then it
clicks what a user clicks and reads the result back from the DOM, and writes everything as JSON
into a <pre> with ``done: true``. Chromium runs with ``--virtual-time-budget`` and ``--dump-dom``:
virtual time stands still while something loads, so no result depends on how busy the machine
is; a page whose checker did not finish fails with the browser's messages.
"""

from __future__ import annotations

import html.parser
import json
import shutil
import subprocess
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
from vqcli.pipeline.pictures import CAPTION, GAP

BROWSER = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no chromium, chromium-browser or google-chrome on PATH")

CHECKER = """
(async () => {
  const out = {images: [], done: false};
  // An image not loading (a lazy one never started) is given up on after 5 s of virtual time,
  // which passes only while nothing is loading.
  const settle = img => img.complete ? null : new Promise(resolve => {
    img.addEventListener('load', resolve, {once: true});
    img.addEventListener('error', resolve, {once: true});
    setTimeout(resolve, 5000);
  });
  try {
    for (const img of Array.from(document.images)) {
      img.scrollIntoView();
      await settle(img);
      const src = img.getAttribute('src');
      out.images.push({src: src.startsWith('data:') ? src.slice(0, 22) : src,
                       loaded: img.complete && img.naturalWidth > 0, size: [img.naturalWidth, img.naturalHeight]});
    }
    window.scrollTo(0, 0);
    out.probe = await (PROBE)();
    out.done = true;
  } catch (e) { out.error = String(e && e.stack || e); }
  const pre = document.createElement('pre');
  pre.id = 'vqcli-browser-check';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
"""

ROUNDTRIP_PROBE = """async () => {
  const rows = () => Array.from(document.querySelectorAll('#scores tbody tr'));
  const th = Array.from(document.querySelectorAll('#scores thead th')).find(t => t.textContent.startsWith('PSNR'));
  const order = () => ({psnr: rows().map(r => parseFloat(r.cells[th.cellIndex].dataset.v)),
                        rows: rows().map(r => r.dataset.fig),
                        figures: Array.from(document.querySelectorAll('#figures figure')).map(f => f.id)});
  const before = order(); th.click(); const first = order(); th.click(); const second = order();
  const radio = text => Array.from(document.querySelectorAll('label')).find(l => l.textContent.trim() == text).querySelector('input');
  const views = () => Object.fromEntries(Array.from(document.querySelectorAll('#figures figure')).map(f => {
    const both = f.querySelector('img.both').getBoundingClientRect();
    const view = f.querySelector('.view'), box = view.getBoundingClientRect();
    const img = view.querySelector('img').getBoundingClientRect();
    return [f.id, {both: [both.width, both.height], view: [box.width, box.height], at: [img.left - box.left, img.top - box.top]}];
  }));
  radio('original').click(); const original = views();
  radio('reconstruction').click(); const reconstruction = views();
  radio('side by side').click(); const sideBySide = views();
  return {before, first, second, original, reconstruction, sideBySide};
}"""

FEATURES_PROBE = """async () => {
  const rows = () => Array.from(document.querySelectorAll('#layers tbody tr'));
  const result = {};
  for (const th of Array.from(document.querySelectorAll('#layers thead th.sort'))) {
    const read = () => ({layers: rows().map(r => r.cells[0].textContent),
                         values: rows().map(r => parseFloat(r.cells[th.cellIndex].dataset.v))});
    th.click(); const first = read(); th.click(); const second = read();
    result[th.textContent.replace('\\u21C5', '').trim()] = {first, second};
  }
  return result;
}"""


class _Report(html.parser.HTMLParser):
    def __init__(self, dom: str):
        super().__init__()
        self.text: str | None = None
        self._inside = False
        self.feed(dom)

    def handle_starttag(self, tag, attrs):
        if tag == "pre" and dict(attrs).get("id") == "vqcli-browser-check":
            self._inside, self.text = True, ""

    def handle_endtag(self, tag):
        self._inside = self._inside and tag != "pre"

    def handle_data(self, data):
        if self._inside:
            self.text += data


class _Images(html.parser.HTMLParser):
    def __init__(self, page: str):
        super().__init__()
        self.count = 0
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.count += tag == "img"


def browse(page: Path, probe: str, profile: Path) -> dict:
    """Open ``page`` (with the checker) in headless Chromium; the checker's report."""
    text = page.read_text(encoding="utf-8")
    head, end, tail = text.rpartition("</body>")
    assert end, f"{page}: no </body>"
    copy = page.with_name("browser-check.html")
    copy.write_text(f"{head}<script>{CHECKER.replace('PROBE', probe)}</script>{end}{tail}", encoding="utf-8")
    command = [
        BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}",
        "--window-size=1280,1024", "--virtual-time-budget=120000", "--dump-dom", copy.as_uri(),
    ]
    try:
        r = subprocess.run(command, capture_output=True, text=True, timeout=600)
    finally:
        copy.unlink()
    report = _Report(r.stdout).text
    assert report is not None, f"the checker wrote no report (exit {r.returncode}): {r.stderr[-3000:]}"
    result = json.loads(report)
    assert result["done"], f"the checker did not finish: {result.get('error')}"
    assert len(result["images"]) == _Images(text).count  # it saw every <img> of the page
    return result


def not_loaded(result: dict) -> set[str]:
    return {unquote(i["src"]) for i in result["images"] if not i["loaded"]}


def check_sizes(result: dict, folder: Path) -> None:
    """Every linked picture shown at the size of its file."""
    for i in result["images"]:
        if not i["src"].startswith("data:"):
            with Image.open(folder / unquote(i["src"])) as picture:
                assert tuple(i["size"]) == picture.size, i


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "kl.safetensors"
    save_native(AutoEncoder(AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)), path)
    return path


def test_roundtrip_gallery_renders_every_picture_sorts_and_toggles(tmp_path, model_file):
    inputs = tmp_path / "in"
    (inputs / "sub dir").mkdir(parents=True)
    rng = np.random.default_rng(5)
    # different noise levels, so that the PSNRs differ; enough pictures that some start below the fold
    names = ["a.png", "sub dir/b #1.png", "ü & <c>.png", "d.png", "e.png", "f.png"]
    for k, name in enumerate(names):
        base = np.full((24 + 4 * k, 40, 3), 128, dtype=np.uint8)
        noisy = np.clip(base + rng.normal(0, 4 + 12 * k, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(inputs / name)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["roundtrip", str(inputs), "-o", str(out), "--model", str(model_file), "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    images = json.loads(r.stdout)["images"]
    assert len(images) == len(names)

    result = browse(out / "index.html", ROUNDTRIP_PROBE, tmp_path / "profile")
    assert not_loaded(result) == set()
    check_sizes(result, out)
    linked = {unquote(i["src"]) for i in result["images"]}
    assert linked == {Path(i["picture"]).relative_to(out).as_posix() for i in images}

    probe = result["probe"]
    psnr = probe["before"]["psnr"]
    assert len(set(psnr)) == len(psnr)  # (distinct, so that the order is one)
    assert probe["first"]["psnr"] == sorted(psnr, reverse=True)  # the first click: best first
    assert probe["second"]["psnr"] == sorted(psnr)  # the second: worst first
    for clicked in (probe["first"], probe["second"]):
        assert clicked["figures"] == clicked["rows"]  # the pictures follow the table
    for k, image in enumerate(images):
        w, h = image["width"], image["height"]
        with Image.open(image["picture"]) as picture:
            size = list(picture.size)
        assert probe["sideBySide"][f"f{k}"] == {"both": size, "view": [0, 0], "at": [0, 0]}
        assert probe["original"][f"f{k}"] == {"both": [0, 0], "view": [w, h], "at": [0, -CAPTION]}
        assert probe["reconstruction"][f"f{k}"] == {"both": [0, 0], "view": [w, h], "at": [-(w + GAP), -CAPTION]}

    # negative: a picture gone, the checker says which
    gone = Path(images[-1]["picture"])
    gone.unlink()
    result = browse(out / "index.html", "async () => null", tmp_path / "profile")
    assert not_loaded(result) == {gone.relative_to(out).as_posix()}


def test_features_gallery_renders_every_picture_and_sorts_by_each_column(tmp_path, model_file):
    image = tmp_path / "in & <x> ü.png"
    Image.fromarray(np.random.default_rng(6).integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "feats #1"
    r = CliRunner().invoke(app, ["features", str(image), "-o", str(out), "--model", str(model_file), "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    layers = json.loads(r.stdout)["layers"]

    result = browse(out / "index.html", FEATURES_PROBE, tmp_path / "profile")
    assert not_loaded(result) == set()
    check_sizes(result, out)
    srcs = [unquote(i["src"]) for i in result["images"]]
    assert srcs == ["data:image/png;base64,", "overview.png", *(f"layers/{row['layer']}.png" for row in layers)]
    assert result["images"][0]["size"] == [28, 20]  # the input, embedded

    columns = {"#": lambda k, row: k, "channels": lambda k, row: row["shape"][0], "height": lambda k, row: row["shape"][1],
               "width": lambda k, row: row["shape"][2], **{s: (lambda s: lambda k, row: row[s])(s) for s in ("mean", "std", "min", "max")}}
    probe = result["probe"]
    assert set(probe) == set(columns)
    for name, value in columns.items():
        expected = {row["layer"]: value(k, row) for k, row in enumerate(layers)}
        for clicked, descending in ((probe[name]["first"], True), (probe[name]["second"], False)):
            assert sorted(clicked["layers"]) == sorted(expected)  # every row still there, once
            assert dict(zip(clicked["layers"], clicked["values"])) == pytest.approx(expected)  # rows move whole
            assert clicked["values"] == sorted(clicked["values"], reverse=descending), name

    # negative: a layer's picture gone, the checker says which
    gone = f"layers/{layers[3]['layer']}.png"
    (out / gone).unlink()
    result = browse(out / "index.html", "async () => null", tmp_path / "profile")
    assert not_loaded(result) == {gone}


COMPARE_PROBE = """async () => {
  const rows = () => Array.from(document.querySelectorAll('#scores tbody tr'));
  const heads = Array.from(document.querySelectorAll('#scores thead th[onclick]'));
  const sorted = {};
  for (const [k, th] of heads.entries()) {
    const read = () => ({values: rows().map(r => parseFloat(r.cells[1 + k].dataset.v)), rows: rows().map(r => r.dataset.fig),
                         figures: Array.from(document.querySelectorAll('#figures figure')).map(f => f.id)});
    th.click(); const first = read(); th.click(); sorted[k] = {first, second: read()};
  }
  const radio = text => Array.from(document.querySelectorAll('label')).find(l => l.textContent.trim() == text).querySelector('input');
  const views = () => Object.fromEntries(Array.from(document.querySelectorAll('#figures figure')).map(f => {
    const view = f.querySelector('.view'), box = view.getBoundingClientRect();
    const img = view.querySelector('img').getBoundingClientRect();
    return [f.id, {view: [box.width, box.height], at: [img.left - box.left, img.top - box.top]}];
  }));
  const shown = {};
  for (const label of ['original', 'one.safetensors', 'two.safetensors']) { radio(label).click(); shown[label] = views(); }
  return {heads: heads.length, sorted, shown};
}"""


def test_comparison_gallery_renders_sorts_by_each_models_columns_and_shows_each_model(tmp_path, model_file):
    """compare.html of `roundtrip --model A --model B`: every picture, each of the 6 columns
    (PSNR, SSIM, ΔE00 per model) sorts, and each model's reconstruction can be shown alone."""
    torch.manual_seed(1)
    two = tmp_path / "two.safetensors"
    save_native(AutoEncoder(AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)), two)
    one = tmp_path / "one.safetensors"
    one.write_bytes(model_file.read_bytes())
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(7)
    for k in range(3):
        base = np.full((20 + 4 * k, 32, 3), 128, dtype=np.uint8)
        Image.fromarray(np.clip(base + rng.normal(0, 4 + 20 * k, base.shape), 0, 255).astype(np.uint8)).save(inputs / f"{k}.png")
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["roundtrip", str(inputs), "-o", str(out), "--model", str(one), "--model", str(two), "--json"])
    assert r.exit_code == 0, r.output
    models = json.loads(r.stdout)["models"]

    result = browse(out / "compare.html", COMPARE_PROBE, tmp_path / "profile")
    assert not_loaded(result) == set()
    check_sizes(result, out)
    probe = result["probe"]
    assert probe["heads"] == 6
    for k, clicked in probe["sorted"].items():
        model, key = models[int(k) // 3], ("psnr", "ssim", "ciede2000")[int(k) % 3]
        expected = {f"f{i}": image[key] for i, image in enumerate(model["images"])}
        for state, descending in ((clicked["first"], True), (clicked["second"], False)):
            assert dict(zip(state["rows"], state["values"])) == pytest.approx(expected, abs=1e-4)  # rows move whole
            assert state["values"] == sorted(state["values"], reverse=descending)
            assert state["figures"] == state["rows"]
    for i, image in enumerate(models[0]["images"]):
        w, h = image["width"], image["height"]
        for panel, label in enumerate(("original", "one.safetensors", "two.safetensors")):
            assert probe["shown"][label][f"f{i}"] == {"view": [w, h], "at": [-panel * (w + GAP), -CAPTION]}
