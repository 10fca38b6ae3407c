"""`vqcli roundtrip` and the quality metrics, against independent computations."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import structural_similarity
from typer.testing import CliRunner

from vqcli import AutoEncoder, AutoEncoderConfig
from vqcli.checkpoints.native import save_native
from vqcli.cli import app
from vqcli.io.images import load_image
from vqcli.metrics import channel_bias, ciede2000, psnr, ssim
from vqcli.pipeline import pictures

SAMPLES = Path(__file__).resolve().parents[1] / "sample_images"


def _skimage_ssim(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    return structural_similarity(
        a, b, channel_axis=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=data_range
    )


@pytest.mark.parametrize("name", ["coffee.png", "camera.png"])
@pytest.mark.parametrize("noise", [0.01, 0.1])
def test_ssim_and_psnr_agree_with_references_on_photographs(name, noise):
    a = load_image(SAMPLES / name)
    rng = np.random.default_rng(0)
    b = np.clip(a + rng.normal(0.0, noise, a.shape), 0.0, 1.0).astype(np.float32)
    assert ssim(a, b) == pytest.approx(_skimage_ssim(a, b, 1.0), abs=1e-5)  # skimage works in float32
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    assert psnr(a, b) == pytest.approx(10 * np.log10(1.0 / mse), abs=1e-9)


def test_metrics_extremes():
    a = load_image(SAMPLES / "rocket.jpg")
    assert psnr(a, a) == float("inf")
    assert ssim(a, a) == pytest.approx(1.0)
    inverted = 1.0 - a  # anti-correlated structure: low, and still what the reference says
    assert ssim(a, inverted) < 0.5
    assert ssim(a, inverted) == pytest.approx(_skimage_ssim(a, inverted, 1.0), abs=1e-5)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    import torch

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_native(AutoEncoder(AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, name="tiny")), path)
    return path


def test_roundtrip_reports_metrics_that_match_its_pictures(tmp_path, model_file):
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(1)
    for name, (h, w) in {"a.png": (37, 50), "b.png": (64, 64)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(inputs / name)
    (inputs / "notes.txt").write_text("not an image")
    result = CliRunner().invoke(app, ["roundtrip", str(inputs), "-o", str(tmp_path / "out"), "--model", str(model_file), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["done"] == 2 and summary["failed"] == 0
    by_name = {Path(i["path"]).name: i for i in summary["images"]}
    assert set(by_name) == {"a.png", "b.png"}
    for name, entry in by_name.items():
        original = np.asarray(Image.open(inputs / name).convert("RGB"))
        h, w = original.shape[:2]
        picture = np.asarray(Image.open(tmp_path / "out" / f"{name}.roundtrip.png").convert("RGB"))
        top, gap = pictures.CAPTION, pictures.GAP
        assert picture.shape == (h + 2 * top, 3 * w + 2 * gap, 3)
        panels = [picture[top : top + h, i * (w + gap) : i * (w + gap) + w] for i in range(3)]
        assert np.array_equal(panels[0], original)
        reconstruction = panels[1].astype(np.float64)
        errors = panels[2].astype(np.float64)
        for i in (1, 2):  # panels separated by grey columns, captions included
            assert (picture[: top + h, i * (w + gap) - gap : i * (w + gap)] == pictures.SEPARATOR).all()
        # each panel labelled above (dark text on white), the metrics written below
        for i in range(3):
            caption = picture[:top, i * (w + gap) : i * (w + gap) + w]
            assert (caption.max(axis=-1) < 100).any() and (caption == 255).all(axis=-1).any()
        assert (picture[top + h :].max(axis=-1) < 100).any()
        expected_errors = np.clip(np.abs(original - reconstruction) * 4, 0, 255)
        assert np.abs(errors - expected_errors).max() <= 1.0
        mse = np.mean((original.astype(np.float64) - reconstruction) ** 2)
        assert entry["psnr"] == pytest.approx(10 * np.log10(255.0**2 / mse), abs=0.01)
        assert entry["ssim"] == pytest.approx(_skimage_ssim(original.astype(np.float64), reconstruction, 255.0), abs=1e-4)
        # the colour difference and bias of the picture's reconstruction, computed here directly
        assert entry["ciede2000"] == pytest.approx(ciede2000(original / 255.0, reconstruction / 255.0), abs=1e-4)
        assert entry["ciede2000"] > 0.1  # (a random model: far from the original)
        expected_bias = channel_bias(original / 255.0, reconstruction / 255.0)
        assert entry["bias"] == pytest.approx(list(expected_bias), abs=1e-3) and len(entry["bias"]) == 3
    assert set(summary["mean"]) == {"psnr", "ssim", "ciede2000", "bias"}
    for key in ("psnr", "ssim", "ciede2000"):
        assert summary["mean"][key] == pytest.approx(np.mean([i[key] for i in summary["images"]]), abs=0.01)
    assert summary["mean"]["bias"] == pytest.approx(np.mean([i["bias"] for i in summary["images"]], axis=0), abs=1e-3)


def test_roundtrip_names_a_broken_file_and_goes_on(tmp_path, model_file):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(inputs / "good.png")
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    # (a console wide enough for the table's paths, whatever the temporary folder's length)
    result = CliRunner().invoke(
        app, ["roundtrip", str(inputs), "-o", str(tmp_path / "out"), "--model", str(model_file)], env={"COLUMNS": "400"}
    )
    assert result.exit_code == 1
    assert "broken.png" in result.stderr and "good.png" in result.stdout
    assert "ΔE00" in result.stdout  # the colour difference's column
    assert (tmp_path / "out" / "good.png.roundtrip.png").exists()
    assert not (tmp_path / "out" / "broken.png.roundtrip.png").exists()


def test_side_by_side_labels_name_each_panel_and_the_metrics():
    """The text drawn is Pillow's default font rendering the labels and the metrics: the picture's
    strips equal the same text drawn alone on white."""
    from PIL import ImageDraw, ImageFont

    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (40, 120, 3), dtype=np.uint8)
    reconstruction = np.clip(original.astype(int) + 3, 0, 255).astype(np.uint8)
    picture = pictures.side_by_side(original, reconstruction, 31.234, 0.98765, 2.346)
    top, gap, w = pictures.CAPTION, pictures.GAP, 120

    def drawn(text: str, width: int) -> np.ndarray:
        strip = Image.new("RGB", (width, top), (255, 255, 255))
        ImageDraw.Draw(strip).text((2, 2), text, fill=(0, 0, 0), font=ImageFont.load_default())
        return np.asarray(strip)

    for i, label in enumerate(("original", "reconstruction", "error x4")):
        assert np.array_equal(picture[:top, i * (w + gap) : i * (w + gap) + w], drawn(label, w))
    assert np.array_equal(picture[top + 40 :], drawn("PSNR 31.23 dB   SSIM 0.9877   dE00 2.35", 3 * w + 2 * gap))


def test_gallery_links_every_picture_relatively_and_sorts(tmp_path, model_file):
    """index.html in the output folder: a row and a figure per image, every picture linked by a
    relative path that exists (so the folder can move), PSNR and SSIM as the JSON says."""
    import html.parser
    import shutil
    from urllib.parse import unquote

    inputs = tmp_path / "in"
    (inputs / "sub dir").mkdir(parents=True)
    rng = np.random.default_rng(2)
    for name, (h, w) in {"a.png": (20, 24), "sub dir/b #1.png": (16, 16)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(inputs / name)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["roundtrip", str(inputs), "-o", str(out), "--model", str(model_file), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    moved = shutil.move(str(out), str(tmp_path / "elsewhere"))  # (relative links: it opens from anywhere)

    class Page(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.images, self.cells = [], []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "img":
                self.images.append(a["src"])
            if tag == "td" and "data-v" in a:
                self.cells.append(float(a["data-v"]))

    page = Page()
    page.feed((Path(moved) / "index.html").read_text(encoding="utf-8"))
    assert page.images and all(not src.startswith(("/", "http", "file:")) for src in page.images)
    assert {unquote(src) for src in page.images} == {"a.png.roundtrip.png", "sub dir/b #1.png.roundtrip.png"}
    for src in page.images:
        assert (Path(moved) / unquote(src)).is_file()
    expected = [v for i in summary["images"] for v in (i["psnr"], i["ssim"], i["ciede2000"])]
    assert page.cells == pytest.approx(expected, abs=1e-4)
    text = (Path(moved) / "index.html").read_text(encoding="utf-8")
    for i in summary["images"]:  # each figure's caption says its colour difference
        assert f"ΔE00 {i['ciede2000']:.2f}</figcaption>" in text
    # a file of someone else's named index.html is kept
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "index.html").write_text("mine")
    r = CliRunner().invoke(app, ["roundtrip", str(inputs / "a.png"), "-o", str(tmp_path / "other"), "--model", str(model_file)])
    assert r.exit_code == 0 and (tmp_path / "other" / "index.html").read_text() == "mine"
    assert "not written, a file of someone else's is there" in r.stderr


def test_gallery_shows_a_hostile_name_as_text(tmp_path):
    """A file name with markup, quotes and control characters is shown as it is (control
    characters as escapes), in the table, the caption and the alt text; never as markup."""
    import html.parser

    from vqcli.pipeline.gallery import gallery_html

    name = 'x <b>"q"</b> & \x1b[31m\n.png'
    row = {"path": name, "picture": tmp_path / "p.png", "width": 4, "height": 4, "psnr": 30.0, "ssim": 0.9, "ciede2000": 2.0}
    page_text = gallery_html([row], tmp_path, title="t \x07")

    class Page(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.data, self.alts = [], [], []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            self.alts += [v for k, v in attrs if k == "alt"]

        def handle_data(self, data):
            self.data.append(data)

    page = Page()
    page.feed(page_text)
    shown = name.replace("\x1b", "\\x1b").replace("\n", "\\n")
    assert "b" not in page.tags and "\x1b" not in page_text and "\x07" not in page_text
    assert shown in page.data and page.alts == [shown, shown]
    assert any(d.startswith(shown + ": PSNR") for d in page.data) and "t \\x07" in page.data


def test_roundtrip_keeps_a_picture_only_for_the_same_model(tmp_path, model_file):
    """A re-run into the same folder skips a picture made by the same model from the same input;
    one made by another model fails with the reason (old: kept and counted as done), --overwrite
    replaces it."""
    import torch

    torch.manual_seed(1)
    other = tmp_path / "other.safetensors"
    save_native(AutoEncoder(AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4)), other)
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(inputs / "a.png")
    out, picture = tmp_path / "out", tmp_path / "out" / "a.png.roundtrip.png"

    def run(model, *more):
        r = CliRunner().invoke(app, ["roundtrip", str(inputs), "-o", str(out), "--model", str(model), "--json", *more])
        return r, json.loads(r.stdout)

    r, s = run(model_file)
    assert r.exit_code == 0 and s["done"] == 1
    first = picture.read_bytes()
    r, s = run(model_file)
    assert r.exit_code == 0 and s["skipped"] == 1 and picture.read_bytes() == first
    r, s = run(other)
    assert r.exit_code == 1 and s["failed"] == 1 and picture.read_bytes() == first
    assert "a.png: exists, made with another model: --overwrite to replace" in r.stderr
    r, s = run(other, "--overwrite")
    assert r.exit_code == 0 and s["done"] == 1 and picture.read_bytes() != first
    os.utime(inputs / "a.png", ns=(1, 1))  # (the same bytes, another time stamp: another version)
    r, s = run(other)
    assert r.exit_code == 1 and "made from another version of the input" in r.stderr


def test_means_do_not_depend_on_the_order_of_the_images():
    """torchrun's rank 0 sums the images in another order than one process does: the reported
    mean must not change (seen: ΔE00 34.0915 against 34.0914)."""
    from vqcli.cli.quality import fill_mean

    rows = [{"psnr": v, "ssim": 0.5, "ciede2000": v, "bias": [v, -v, 0.0]} for v in (1e16, 3.0, -1e16)]
    means = []
    for order in (rows, [rows[0], rows[2], rows[1]]):  # (summed as they come: 4/3 and 1)
        mean: dict = {}
        fill_mean(order, mean)
        means.append(mean)
    assert means[0] == means[1]
    assert means[0]["ciede2000"] == 1.0 and means[0]["bias"] == [1.0, -1.0, 0.0] and means[0]["psnr"] == 1.0
