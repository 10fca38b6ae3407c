"""`vqcli roundtrip --model A --model B`: several models compared on the same images, against
one-model runs of each (the oracle: the same numbers, the same reconstruction pixels)."""

from __future__ import annotations

import html.parser
import json
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont
from typer.testing import CliRunner

from vqcli import AutoEncoder, AutoEncoderConfig
from vqcli.checkpoints.native import save_native
from vqcli.cli import app
from vqcli.pipeline import pictures

CONFIGS = {
    "kl.safetensors": AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, name="tiny-kl"),
    "vq.safetensors": AutoEncoderConfig(
        kind="vq", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=3, embed_dim=4, n_embed=64, name="tiny-vq"
    ),
}
IMAGES = {"a.png": (37, 50), "sub/b.png": (32, 32)}


def invoke(*args, env: dict | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "100", **(env or {})})


def panel(picture: np.ndarray, index: int, height: int, width: int) -> np.ndarray:
    top, left = pictures.panel_origin(index, width)
    return picture[top : top + height, left : left + width]


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    """Two tiny random models (a KL and a VQ) saved to files, two images, and a one-model run of
    each model (the oracle)."""
    import torch

    root = tmp_path_factory.mktemp("compare")
    models = []
    for seed, (name, config) in enumerate(CONFIGS.items()):
        torch.manual_seed(seed)
        save_native(AutoEncoder(config), root / name)
        models.append(root / name)
    rng = np.random.default_rng(3)
    for name, (h, w) in IMAGES.items():
        (root / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "in" / name)
    singles = []
    for k, model in enumerate(models):
        r = invoke("roundtrip", root / "in", "-o", root / f"one{k}", "--model", model, "--json")
        assert r.exit_code == 0, r.output
        singles.append(json.loads(r.stdout))
    return {"root": root, "models": models, "singles": singles}


def test_two_models_report_each_models_single_run_numbers_and_pixels(work, monkeypatch):
    root, models, singles = work["root"], work["models"], work["singles"]
    out = root / "both"
    r = invoke("roundtrip", root / "in", "-o", out, "--model", models[0], "--model", models[1], "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["command"] == "roundtrip" and summary["ok"] and summary["done"] == 2
    assert [m["name"] for m in summary["models"]] == ["kl.safetensors", "vq.safetensors"]
    for k, (entry, single) in enumerate(zip(summary["models"], singles)):
        assert entry["sha256"] == single["model"]["sha256"] and entry["kind"] == single["model"]["kind"]
        assert entry["dtype"] == single["dtype"]
        by_path = {i["path"]: i for i in single["images"]}
        assert sorted(i["path"] for i in entry["images"]) == sorted(by_path)
        for image in entry["images"]:
            expected = by_path[image["path"]]
            for key in ("psnr", "ssim", "ciede2000", "bias", "width", "height"):
                assert image[key] == expected[key], (k, image["path"], key)
            # the comparison picture: original, then each model's reconstruction pixel for pixel
            h, w = image["height"], image["width"]
            picture, one = read(Path(image["picture"])), read(Path(expected["picture"]))
            assert picture.shape == (4 * pictures.CAPTION + h, 3 * w + 2 * pictures.GAP, 3)
            assert np.array_equal(panel(picture, 0, h, w), read(Path(image["path"])))
            assert np.array_equal(panel(picture, 1 + k, h, w), panel(one, 1, h, w))
        assert entry["mean"] == single["mean"]
        assert isinstance(entry["seconds_per_image"], float) and entry["seconds_per_image"] > 0
    # names never meet a one-model run's: a.png.compare.png and compare.html only
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["a.png.compare.png", "compare.html", "sub/b.png.compare.png"]
    # the table: a column per model, the means and each image's PSNR, in 100 columns
    monkeypatch.chdir(root)  # (short paths in the table's rows)
    r = invoke("roundtrip", "in", "-o", "both-table", "--model", models[0], "--model", models[1])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert "kl.safetensors" in r.stdout and "vq.safetensors" in r.stdout

    def row(label: str) -> list[str]:
        found = [line for line in lines if line.strip("│ ").startswith(label)]
        assert len(found) == 1, (label, r.stdout)
        return [cell.strip() for cell in found[0].split("│")[-3:-1]]

    means = [single["mean"] for single in singles]
    assert row("PSNR (dB)") == [f"{m['psnr']:.2f}" for m in means]
    assert row("SSIM") == [f"{m['ssim']:.4f}" for m in means]
    assert row("ΔE00") == [f"{m['ciede2000']:.2f}" for m in means]
    psnr_of = [{Path(i["path"]).name: i["psnr"] for i in single["images"]} for single in singles]
    assert row("in/a.png PSNR") == [f"{p['a.png']:.2f}" for p in psnr_of]


def test_comparison_gallery_links_each_picture_and_sorts_per_model(work):
    root, models = work["root"], work["models"]
    out = root / "gallery"
    r = invoke("roundtrip", root / "in", "-o", out, "--model", models[0], "--model", models[1], "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)

    class Page(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.images, self.cells, self.sorts = [], [], []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "img" and a.get("class") == "both":
                self.images.append(unquote(a["src"]))
            if tag == "td" and "data-v" in a:
                self.cells.append(float(a["data-v"]))
            if tag == "th" and "onclick" in a:
                self.sorts.append(a["onclick"])

    page = Page()
    page.feed((out / "compare.html").read_text(encoding="utf-8"))
    assert not (out / "index.html").exists()
    first, second = summary["models"]
    assert page.images == [Path(i["picture"]).relative_to(out).as_posix() for i in first["images"]]
    expected = [
        v for a, b in zip(first["images"], second["images"]) for s in (a, b) for v in (s["psnr"], s["ssim"], s["ciede2000"])
    ]
    assert page.cells == pytest.approx(expected, abs=1e-4)
    assert page.sorts == [f"sortBy({c})" for c in range(1, 7)]  # every column sortable, a group per model


def test_comparison_resumes_only_the_same_comparison(work):
    root, models = work["root"], work["models"]
    out = root / "resume"
    a, b = models
    assert invoke("roundtrip", root / "in", "-o", out, "--model", a, "--model", b).exit_code == 0
    picture = out / "a.png.compare.png"
    before = picture.read_bytes()
    r = invoke("roundtrip", root / "in", "-o", out, "--model", a, "--model", b, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["skipped"] == 2
    # other models (here: the same two in another order) fail, the pictures kept
    r = invoke("roundtrip", root / "in", "-o", out, "--model", b, "--model", a, "--json")
    assert r.exit_code == 1 and json.loads(r.stdout)["failed"] == 2
    assert "made with another model: --overwrite to replace" in r.stderr
    assert picture.read_bytes() == before
    r = invoke("roundtrip", root / "in", "-o", out, "--model", b, "--model", a, "--overwrite", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["done"] == 2
    h, w = IMAGES["a.png"]
    swapped = read(picture)
    first = read(root / "one0" / "a.png.roundtrip.png")
    assert np.array_equal(panel(swapped, 2, h, w), panel(first, 1, h, w))  # kl's reconstruction, now second
    # a one-model run into the same folder leaves the comparison alone
    r = invoke("roundtrip", root / "in", "-o", out, "--model", a)
    assert r.exit_code == 0 and (out / "a.png.roundtrip.png").is_file() and (out / "index.html").is_file()
    assert np.array_equal(read(picture), swapped) and (out / "compare.html").is_file()
    # a file of someone else's where a comparison picture would go is never replaced
    other = root / "other"
    (other / "sub").mkdir(parents=True)
    (other / "a.png.compare.png").write_bytes(b"mine")
    r = invoke("roundtrip", root / "in", "-o", other, "--model", a, "--model", b, "--overwrite")
    assert r.exit_code == 1 and (other / "a.png.compare.png").read_bytes() == b"mine"


@pytest.mark.parametrize(
    "case", ["same name", "same weights", "missing model", "shard", "manifest", "torchrun"]
)
def test_comparison_refusals_are_one_line(work, case, tmp_path):
    a, b = work["models"]
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(a.read_bytes())
    inputs = work["root"] / "in"
    out = tmp_path / "out"
    args, env, code, says = {
        "same name": (["--model", a, "--model", b, "--model", a], None, 2, "is given twice"),
        "same weights": (["--model", a, "--model", copy], None, 2, "the same weights as"),
        "missing model": (["--model", a, "--model", tmp_path / "none.safetensors"], None, None, "none.safetensors"),
        "shard": (["--model", a, "--model", b, "--shard", "0/2"], None, 2, "runs in one process"),
        "manifest": (["--model", a, "--model", b, "--manifest"], None, 2, "runs in one process"),
        "torchrun": (["--model", a, "--model", b], {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, 2, "not under torchrun"),
    }[case]
    r = invoke("roundtrip", inputs, "-o", out, *args, env=env)
    assert r.exit_code == code if code is not None else r.exit_code != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], r.stderr
    assert "Traceback" not in r.output
    assert not out.exists() or not any(out.rglob("*.png"))


def test_comparison_picture_labels_each_model_and_its_metrics():
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (20, 90, 3), dtype=np.uint8)
    recs = [("alpha", original // 2, {"psnr": 12.345, "ssim": 0.5, "ciede2000": 3.216}),
            ("beta", 255 - original, {"psnr": 8.0, "ssim": -0.25, "ciede2000": 40.0})]
    picture = pictures.comparison(original, recs)
    top, gap, h, w = pictures.CAPTION, pictures.GAP, 20, 90

    def drawn(text: str) -> np.ndarray:
        strip = Image.new("RGB", (w, top), (255, 255, 255))
        ImageDraw.Draw(strip).text((2, 2), text, fill=(0, 0, 0), font=ImageFont.load_default())
        return np.asarray(strip)

    assert picture.shape == (h + 4 * top, 3 * w + 2 * gap, 3)
    for index, label in enumerate(["original", "alpha", "beta"]):
        left = index * (w + gap)
        assert np.array_equal(picture[:top, left : left + w], drawn(label))
        assert np.array_equal(panel(picture, index, h, w), [original, original // 2, 255 - original][index])
        if index:
            assert (picture[: top + h, left - gap : left] == pictures.SEPARATOR).all()
    lines = [["PSNR 12.35 dB", "SSIM 0.5000", "dE00 3.22"], ["PSNR 8.00 dB", "SSIM -0.2500", "dE00 40.00"]]
    for index, texts in enumerate(lines, start=1):
        left = index * (w + gap)
        for line, text in enumerate(texts):
            strip = picture[top + h + line * top : top + h + (line + 1) * top, left : left + w]
            assert np.array_equal(strip, drawn(text))
    assert (picture[top + h :, :w] == 255).all()  # nothing under the original
