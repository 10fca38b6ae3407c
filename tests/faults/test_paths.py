"""Awkward paths: the output inside the input, one folder for both, link loops, pipes, unreadable
files and folders, and names with spaces, unicode, leading dashes, markup and bytes that are not
UTF-8. No hang, each real file once, outputs never read back as inputs, one line per bad file.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vqcli.cli import app
from vqcli.io.latents import read_latent

from .conftest import finals, image_folder, photo, run, snapshot, write_image

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _summary(r) -> dict:
    assert "Traceback" not in r.output, r.output
    return json.loads(r.stdout)


def _names(folder: Path) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in finals(folder, "*") if p.is_file()]


def test_output_inside_the_input_is_never_read_back(tmp_path, models):
    src = image_folder(tmp_path / "in", 3, size=16, sub_every=2)
    m = models["kl"]
    lat = src / "lat"
    assert _summary(cli("encode", src, "-o", lat, "--model", m, "--json"))["done"] == 3
    assert _summary(cli("decode", lat, "-o", lat / "rec", "--model", m, "--json"))["done"] == 3
    # the decoded images sit inside the output folder, itself inside the input: not inputs
    s = _summary(cli("encode", src, "-o", lat, "--model", m, "--json"))
    assert (s["total"], s["skipped"], s["done"]) == (3, 3, 0)
    (tmp_path / "link").symlink_to(lat, target_is_directory=True)  # the same output by another name
    s = _summary(cli("encode", src, "-o", tmp_path / "link", "--model", m, "--json"))
    assert (s["total"], s["skipped"]) == (3, 3)
    s = _summary(cli("encode", src, "-o", src / "." / "lat", "--model", m, "--json"))
    assert (s["total"], s["skipped"]) == (3, 3)
    assert sorted(_names(lat)) == [
        "rec/s0/000.png", "rec/s0/001.png", "rec/s1/002.png",
        "s0/000.png.safetensors", "s0/001.png.safetensors", "s1/002.png.safetensors",
    ]


def test_one_folder_for_input_and_output(tmp_path, models):
    src = image_folder(tmp_path / "in", 2, size=16)
    write_image(src / "c.jpg", photo(16, 16, 9), quality=90)
    originals = snapshot(src)
    m = models["kl"]
    assert _summary(cli("encode", src, "-o", src, "--model", m, "--json"))["done"] == 3
    s = _summary(cli("encode", src, "-o", src, "--model", m, "--json"))  # latents are not images
    assert (s["total"], s["skipped"]) == (3, 3)
    r = cli("decode", src, "-o", src, "--model", m, "--json")
    s = _summary(r)
    # 000.png and 001.png are the originals: never replaced; c.jpg -> c.jpg.png is new
    assert (s["done"], s["failed"]) == (1, 2) and r.exit_code == 1
    assert all("was not written by vqcli" in f["reason"] for f in s["failures"])
    assert all(snapshot(src)[k] == v for k, v in originals.items())
    assert (src / "c.jpg.png").is_file()


def test_unreadable_file_and_folder_fail_alone(tmp_path, models, monkeypatch):
    """Permission denied, simulated (root reads everything): the file's open and the folder's
    listing fail as they would for another user; those two fail, the rest is done."""
    src = image_folder(tmp_path / "in", 3, size=16)
    write_image(src / "locked" / "x.png", photo(16, 16, 4))
    secret, locked = src / "001.png", src / "locked"
    real_open, real_scandir = builtins.open, os.scandir

    def denied(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))

    def fake_open(file, *a, **k):
        if isinstance(file, (str, os.PathLike)) and Path(file) == secret:
            denied(file)
        return real_open(file, *a, **k)

    def fake_scandir(path="."):
        if isinstance(path, (str, os.PathLike)) and Path(path) == locked:
            denied(path)
        return real_scandir(path)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "scandir", fake_scandir)
    r = cli("encode", src, "-o", tmp_path / "lat", "--model", models["kl"], "--json")
    s = _summary(r)
    assert r.exit_code == 1 and (s["done"], s["failed"]) == (2, 2)
    reasons = {f["path"]: f["reason"] for f in s["failures"]}
    assert reasons[str(secret)] == "permission denied"
    assert reasons[str(locked)] == "cannot read folder (Permission denied)"
    assert sorted(_names(tmp_path / "lat")) == ["000.png.safetensors", "002.png.safetensors"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file whatever its mode (see the simulated test)")
def test_unreadable_file_by_its_mode(tmp_path, models):
    src = image_folder(tmp_path / "in", 2, size=16)
    (src / "001.png").chmod(0)
    r = cli("encode", src, "-o", tmp_path / "lat", "--model", models["kl"], "--json")
    s = _summary(r)
    assert r.exit_code == 1 and (s["done"], s["failed"]) == (1, 1)
    assert s["failures"][0] == {"path": str(src / "001.png"), "reason": "permission denied"}


# Names that break careless code: options, spaces, markup, unicode, bytes that are not UTF-8.
NAMES = ["-x.png", "--help.png", "sp ace.png", "[bold]b[red].png", "ü日本.png", os.fsdecode(b"\xff\xfe.png")]


@pytest.mark.slow
def test_hostile_folder_with_the_installed_command(tmp_path, models):
    """One folder with link loops, a folder alias, a named pipe, a dangling link and awkward names:
    no hang, each real image once, one line for each file that cannot be read."""
    src = tmp_path / "in"
    for i, name in enumerate(NAMES):
        write_image(src / name, photo(16, 16, i))
    write_image(src / "sub" / "deep.png", photo(16, 16, 9))
    latin1 = os.fsdecode(b"caf\xe9")  # a folder named in Latin-1: mirrored in the output
    write_image(src / latin1 / "x.png", photo(16, 16, 10))
    (src / "sub" / "loop").symlink_to("..", target_is_directory=True)
    (src / "sub" / "self").symlink_to(".", target_is_directory=True)
    (src / "zalias").symlink_to("sub", target_is_directory=True)  # the same folder by another name
    os.mkfifo(src / "pipe.png")  # opening it for reading would wait for a writer forever
    (src / "dangling.png").symlink_to("nowhere.png")
    out = tmp_path / "lat"
    p = run("encode", src, "-o", out, "--model", models["kl"], "--json", timeout=120)
    assert p.returncode == 1, p.stderr
    s = json.loads(p.stdout)
    assert (s["done"], s["failed"]) == (len(NAMES) + 2, 2)
    assert sorted(p.stderr.strip().splitlines()) == [
        f"{src / 'dangling.png'}: no such file",
        f"{src / 'pipe.png'}: not a regular file (a pipe, socket or device); not read",
    ]
    expected = NAMES + ["sub/deep.png", f"{latin1}/x.png"]
    assert sorted(_names(out)) == sorted(f"{n}.safetensors" for n in expected)
    # the name that is not UTF-8: the file keeps its bytes, the metadata shows them escaped
    weird = out / (NAMES[-1] + ".safetensors")
    assert os.fsencode(weird.name) == b"\xff\xfe.png.safetensors"
    assert read_latent(weird).meta.source == "\\xff\\xfe.png"

    # and back, in-process: every name survives the round trip
    rec = tmp_path / "rec"
    r = cli("decode", out, "-o", rec, "--model", models["kl"], "--json")
    assert r.exit_code == 0 and _summary(r)["done"] == len(expected), r.output
    assert sorted(_names(rec)) == sorted(expected)


def test_names_after_double_dash(tmp_path, models, monkeypatch):
    """Files whose names look like options, given after ``--`` (the argument parsing is Typer's, the
    same in-process as in the installed command)."""
    monkeypatch.chdir(tmp_path)
    for i, name in enumerate(NAMES[:3]):
        write_image(tmp_path / name, photo(16, 16, i))
    r = cli("encode", "-o", "lat", "--model", models["kl"], "--json", "--", *NAMES[:3])
    assert r.exit_code == 0, r.output
    assert _summary(r)["done"] == 3
    for name in NAMES[:3]:
        assert read_latent(tmp_path / "lat" / f"{name}.safetensors").meta.source == name
    r = cli("decode", "-o", "rec", "--model", models["kl"], "--", *(f"lat/{n}.safetensors" for n in NAMES[:3]))
    assert r.exit_code == 0, r.output
    assert sorted(_names(tmp_path / "rec")) == sorted(NAMES[:3])


def test_training_skips_what_an_interrupted_run_left(tmp_path):
    """A folder that a killed decode wrote into holds a half-written image under a temporary name:
    training data is the finished images only (encode and decode skip such names too)."""
    from vqcli.io.atomic import TMP_PREFIX
    from vqcli.train import image_files

    data = image_folder(tmp_path / "data", 2, size=16, sub_every=1)
    half = data / "s0" / f"{TMP_PREFIX}4242-host-0123abcd.png"
    half.write_bytes((data / "s0" / "000.png").read_bytes()[:40])
    assert image_files([data]) == [data / "s0" / "000.png", data / "s1" / "001.png"]
