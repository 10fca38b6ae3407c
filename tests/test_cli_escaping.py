"""Everything that came from a file or a path is printed escaped, never interpreted (issue 17,
finding 7): rich markup (``[/]``, ``[red]``, ``[link=...]``), ESC sequences, NUL and other control
characters, newlines in file names. Every command that prints a path, in people's mode."""

from __future__ import annotations

import numpy as np
import pytest
from _scaleout import cli, photo, save_model
from PIL import Image

from vqcli.cli._app import shown

# Each hostile name and how it must appear (the markup as typed, each control character as an escape).
NAMES = {
    "a[/]b.png": "a[/]b.png",
    "[red]c.png": "[red]c.png",
    "[link=mailto:x@example.com]d.png": "[link=mailto:x@example.com]d.png",
    "e\x1b[31mf.png": "e\\x1b[31mf.png",
    "g\nh.png": "g\\nh.png",
    "i\x07\x7f\r.png": "i\\x07\\x7f\\r.png",
    "\u202ej.png": "\\u202ej.png",
}
RAW = ["\x1b", "\x00", "\x07", "\x7f", "\u202e", "\r"]  # never on the terminal as they are


def check(text: str, *names: str) -> None:
    assert "Traceback" not in text and "MarkupError" not in text, text
    for ch in RAW:
        assert ch not in text, f"{ch!r} reached the output: {text!r}"
    for name in names:
        assert NAMES[name] in text, f"{NAMES[name]!r} not shown in {text!r}"


def test_shown_escapes_controls_and_markup_and_keeps_the_rest():
    from rich.console import Console

    console = Console(width=300, color_system=None, record=True)
    for name, expected in NAMES.items():
        console.print(shown(name), soft_wrap=True)
        assert console.export_text().rstrip("\n") == expected  # one line, as typed
    console.print(shown("x\x00y \udcff ok \\[red]"), soft_wrap=True)
    assert console.export_text().rstrip("\n") == "x\\x00y \\xff ok \\[red]"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("escaping")
    model = save_model(root / "m.safetensors")
    src = root / "in"
    src.mkdir()
    for i, name in enumerate(NAMES):  # ("a[/]b.png": the file "]b.png" in the folder "a[")
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo(16, 16, i)).save(src / name, format="PNG")
    (src / "bad\x1b[2J[red]\n.png").write_bytes(b"not a png")
    return root, model, src


def test_encode_decode_roundtrip_show_hostile_names_escaped(tree, tmp_path):
    root, model, src = tree
    out = tmp_path / "[red]out\x1b"
    r = cli("encode", src, "-o", out, "--model", model, "--device", "cpu", env={"COLUMNS": "300"})
    assert r.exit_code == 1, r.output
    check(r.output)
    failure = [ln for ln in r.output.splitlines() if "bad" in ln]
    assert len(failure) == 1 and "bad\\x1b[2J[red]\\n.png" in failure[0]  # one line
    assert "[red]out\\x1b" in r.output  # the summary's output folder

    (out / "worse[").mkdir()
    (out / "worse[/]\x1b\n.png.safetensors").write_bytes(b"junk")
    r = cli("decode", out, "-o", tmp_path / "dec[/]", "--device", "cpu", "--model", model, env={"COLUMNS": "300"})
    assert r.exit_code == 1, r.output
    check(r.output)
    failure = [ln for ln in r.output.splitlines() if "worse" in ln]
    assert len(failure) == 1 and "worse[/]\\x1b\\n.png.safetensors" in failure[0]
    assert "dec[/]" in r.output

    r = cli("roundtrip", src, "-o", tmp_path / "rt", "--model", model, "--device", "cpu", env={"COLUMNS": "300"})
    assert r.exit_code == 1, r.output
    check(r.output, *NAMES)  # the quality table lists every image


def test_info_shows_metadata_and_names_escaped(tree, tmp_path):
    import torch

    from vqcli.checkpoints.native import load_native
    from vqcli.io.latents import make_meta, write_latent

    root, model, _ = tree
    ae = load_native(model)
    meta = make_meta(ae, source="s\x1b]8;;http://x\x1b\\[link=http://y]z\x00", width=16, height=16,
                     model_name="[bold]m\x1b", model_embedded=False, representation="mean")
    path = tmp_path / "a[/]b.png.safetensors"
    write_latent(path, torch.zeros(meta.latent_shape), meta)
    bad = tmp_path / "e\x1b[31mf.png"
    bad.write_bytes(b"x")
    r = cli("info", path, model, bad, env={"COLUMNS": "300"})
    assert r.exit_code == 1, r.output
    check(r.output, "a[/]b.png", "e\x1b[31mf.png")
    assert "s\\x1b]8;;http://x\\x1b\\[link=http://y]z\\x00" in r.output
    assert "[bold]m\\x1b" in r.output


def test_features_convert_train_show_paths_escaped(tree, tmp_path):
    root, model, src = tree
    image = src / "[red]c.png"
    r = cli("features", image, "-o", tmp_path / "f[/]\x1b", "--model", model, "--device", "cpu",
            env={"COLUMNS": "300"})
    assert r.exit_code == 0, r.output
    check(r.output, "[red]c.png")
    assert "f[/]\\x1b" in r.output

    r = cli("convert", model, "-o", tmp_path / "[link=mailto:e]c\x1b.safetensors", env={"COLUMNS": "300"})
    assert r.exit_code == 0, r.output
    check(r.output)
    assert "[link=mailto:e]c\\x1b.safetensors" in r.output

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        Image.fromarray(np.asarray(photo(32, 32, i))).save(photos / f"{i}.png")
    r = cli("train", photos, "-o", tmp_path / "t[/]\x1b.safetensors", "--steps", "1", "--kind", "kl", "--ch", "32",
            "--ch-mult", "1,2", "--num-res-blocks", "1", "--z-channels", "4", "--crop", "16", "--batch-size", "2",
            "--no-bf16", "--device", "cpu", env={"COLUMNS": "300"})
    assert r.exit_code == 0, r.output
    check(r.output)
    assert "t[/]\\x1b.safetensors" in r.output


def test_a_failure_line_stays_one_line_whatever_the_name(tmp_path):
    """Path errors before any work (usage errors) are escaped too."""
    r = cli("info", tmp_path / "no\nsuch[/]\x1b", env={"COLUMNS": "300"})
    assert r.exit_code != 0
    assert "\x1b" not in r.output and "Traceback" not in r.output
