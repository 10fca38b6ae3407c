"""``--overwrite`` replaces only files vqcli wrote, in every command (issue 17, finding 13):
features (features.safetensors, overview.png, the layer pictures), train -o and convert -o, as
encode and decode do. Anyone else's file in the way is refused with one line, and left as it was."""

from __future__ import annotations

import io

import numpy as np
import pytest
from _scaleout import photo, save_model
from PIL import Image
from typer.testing import CliRunner

from vqcli.cli import app
from vqcli.io.ownership import check_replaceable, is_ours

runner = CliRunner()
TINY_TRAIN = ["--kind", "kl", "--ch", "32", "--ch-mult", "1,2", "--num-res-blocks", "1", "--z-channels", "4",
              "--crop", "16", "--batch-size", "2", "--no-bf16", "--device", "cpu", "--steps", "1", "-q"]


def a_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(photo(8, 8, 3)).save(buf, format="PNG")
    return buf.getvalue()


FOREIGN = {
    "a PNG": a_png(),
    "text": b"my notes",
    "a safetensors file of someone else": b"\x0e\x00\x00\x00\x00\x00\x00\x00{\"x\": \"y\"}    ",
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("overwrite")
    Image.fromarray(photo(16, 16)).save(root / "img.png")
    photos = root / "photos"
    photos.mkdir()
    for i in range(2):
        Image.fromarray(np.asarray(photo(32, 32, i))).save(photos / f"{i}.png")
    return root, save_model(root / "m.safetensors"), photos


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def refused(r, path, content: bytes) -> None:
    assert r.exit_code == 1, r.output
    assert "not written by vqcli" in r.stderr and str(path) in r.stderr and "Traceback" not in r.output
    assert path.read_bytes() == content


@pytest.mark.parametrize("kind", list(FOREIGN))
@pytest.mark.parametrize("name", ["features.safetensors", "overview.png", "layers/decoder.conv_out.png"])
def test_features_overwrite_replaces_only_its_own(setup, tmp_path, name, kind):
    root, model, _ = setup
    out = tmp_path / "f"
    target = out / name
    target.parent.mkdir(parents=True)
    target.write_bytes(FOREIGN[kind])
    r = invoke("features", root / "img.png", "-o", out, "--model", model, "--device", "cpu", "-q", "--overwrite")
    refused(r, target, FOREIGN[kind])
    if name != "features.safetensors":
        assert not (out / "features.safetensors").exists()  # refused before anything was written


def test_features_overwrite_replaces_what_it_wrote(setup, tmp_path):
    root, model, _ = setup
    args = ["features", root / "img.png", "-o", tmp_path / "f", "--model", model, "--device", "cpu", "-q"]
    assert invoke(*args).exit_code == 0
    for p in ["features.safetensors", "overview.png", "layers/decoder.conv_out.png"]:
        assert is_ours(tmp_path / "f" / p), p
    r = invoke(*args)
    assert r.exit_code == 1 and "already exists" in r.stderr
    assert invoke(*args, "--overwrite").exit_code == 0


@pytest.mark.parametrize("kind", list(FOREIGN))
def test_convert_and_train_overwrite_replace_only_their_own(setup, tmp_path, kind):
    root, model, photos = setup
    target = tmp_path / "x.safetensors"
    target.write_bytes(FOREIGN[kind])
    refused(invoke("convert", model, "-o", target, "--overwrite"), target, FOREIGN[kind])
    refused(invoke("train", photos, "-o", target, "--overwrite", *TINY_TRAIN), target, FOREIGN[kind])


def test_convert_and_train_overwrite_their_own_outputs(setup, tmp_path):
    root, model, photos = setup
    target = tmp_path / "x.safetensors"
    assert invoke("convert", model, "-o", target).exit_code == 0
    assert invoke("convert", model, "-o", target).exit_code == 1
    assert invoke("convert", model, "-o", target, "--overwrite").exit_code == 0
    r = invoke("train", photos, "-o", target, "--overwrite", *TINY_TRAIN)  # a vqcli weights file: replaced
    assert r.exit_code == 0, r.output


def test_the_rule(tmp_path):
    check_replaceable(tmp_path / "none", overwrite=False)
    (tmp_path / "d").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "none")
    from vqcli.errors import FileError

    for p in ("d", "link"):
        with pytest.raises(FileError, match="folder or a link"):
            check_replaceable(tmp_path / p, overwrite=True)
        with pytest.raises(FileError, match="already exists"):
            check_replaceable(tmp_path / p, overwrite=False)
