"""A full disk: a clear one-line error naming the file, no partial or temporary file, the inputs
untouched, and the run stops (every later file would fail the same way) with exit code 1; a re-run
after freeing space does the rest.

Two ways to fill a disk. Simulated (always runs, in-process): the writes of latent files and
images (both through Python file objects) into vqcli's temporary files fail with ``ENOSPC`` once a
byte budget is spent. Real (when this machine lets the test mount a small tmpfs, as root can):
every writer of ``encode``, ``decode``, ``train`` (``torch.save``) and ``convert`` (safetensors'
own writer, whose ``SafetensorError`` must come out as ``OSError``), unmodified.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from vqcli.cli import app
from vqcli.io.atomic import TMP_PREFIX
from vqcli.io.latents import read_latent

from .conftest import (
    TRAIN_TINY,
    assert_untouched,
    finals,
    image_folder,
    run,
    snapshot,
    temporaries,
)

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


class FullDisk:
    """Writes into vqcli's temporary files fail like a disk with ``free`` bytes left (one budget for
    all files): the bytes that fit are written, then ``OSError(ENOSPC)``, as a real write fails.

    Files are opened as usual; those opened for writing under a temporary name get a wrapper whose
    ``write`` counts. Its ``fileno`` is unsupported, so that Pillow's encoders write through it (they
    fall back to ``write`` for file objects without one) instead of to the descriptor.
    """

    def __init__(self, monkeypatch, free: int):
        self.free = free
        self.failed: list[str] = []
        real_open = builtins.open

        def fake_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            writing = "w" in mode or "a" in mode
            if writing and isinstance(file, (str, os.PathLike)) and Path(file).name.startswith(TMP_PREFIX):
                return _Limited(f, self, os.fspath(file))
            return f

        monkeypatch.setattr(builtins, "open", fake_open)


class _Limited:
    def __init__(self, f, disk: FullDisk, name: str):
        self._f, self._disk, self._name = f, disk, name

    def write(self, data) -> int:
        n = min(len(data), self._disk.free)
        self._f.write(data[:n])
        self._disk.free -= n
        if n < len(data):
            self._disk.failed.append(self._name)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return n

    def fileno(self):
        raise io.UnsupportedOperation("fileno")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _expect_stopped(r, out: Path, pattern: str, total: int) -> dict:
    """The run stopped at its third file: two complete outputs, one failure line, exit 1."""
    assert r.exit_code == 1, r.output
    s = json.loads(r.stdout)
    assert s["stopped"] == "disk full" and (s["done"], s["failed"], s["total"]) == (2, 1, 3)
    (failure,) = s["failures"]
    output = out / (Path(failure["path"]).name + pattern)
    assert failure["reason"] == f"cannot write {output} (No space left on device)"
    lines = r.stderr.strip().splitlines()
    assert lines == [f"{failure['path']}: {failure['reason']}", lines[1]] and lines[1].startswith("stopped: the disk is full")
    assert len(finals(out, "*")) == 2 and temporaries(out) == []
    assert total > 3  # files were left for the re-run
    return s


def test_simulated_full_disk_stops_encode_cleanly(tmp_path, models, monkeypatch):
    src = image_folder(tmp_path / "in", 6)
    inputs = snapshot(src)
    out = tmp_path / "lat"
    r = cli("encode", src, "-o", out, "--model", models["kl"], "--json")  # one latent file's size, to set the budget
    size = (out / "000.png.safetensors").stat().st_size
    for f in finals(out, "*"):
        f.unlink()
    disk = FullDisk(monkeypatch, free=int(2.5 * size))
    r = cli("encode", src, "-o", out, "--model", models["kl"], "--json")
    _expect_stopped(r, out, ".safetensors", 6)
    assert len(disk.failed) == 1  # the writes queued behind the failed one are not attempted
    for f in finals(out, "*"):
        read_latent(f)
    before = snapshot(out)
    monkeypatch.undo()  # space freed
    r = cli("encode", src, "-o", out, "--model", models["kl"], "--json")
    assert r.exit_code == 0, r.output
    assert (json.loads(r.stdout)["done"], json.loads(r.stdout)["skipped"]) == (4, 2)
    assert_untouched(before, snapshot(out))
    assert_untouched(inputs, snapshot(src))


def test_simulated_full_disk_stops_decode_cleanly(tmp_path, models, monkeypatch):
    src = image_folder(tmp_path / "in", 6)
    lat = tmp_path / "lat"
    assert cli("encode", src, "-o", lat, "--model", models["kl"]).exit_code == 0
    latents = snapshot(lat)
    out = tmp_path / "rec"
    assert cli("decode", lat / "000.png.safetensors", "-o", out, "--model", models["kl"]).exit_code == 0
    size = (out / "000.png").stat().st_size
    (out / "000.png").unlink()
    FullDisk(monkeypatch, free=int(2.5 * size))
    r = cli("decode", lat, "-o", out, "--model", models["kl"], "--json")
    s = json.loads(r.stdout)
    assert r.exit_code == 1 and s["stopped"] == "disk full" and (s["done"], s["failed"]) == (2, 1), r.output
    assert s["failures"][0]["reason"] == f"cannot write {out / '002.png'} (No space left on device)"
    for f in finals(out, "*"):
        with Image.open(f) as im:
            im.load()
    assert len(finals(out, "*")) == 2 and temporaries(out) == []
    assert_untouched(latents, snapshot(lat))


# --- a real full disk -----------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 96 KiB tmpfs, or a skip where this machine does not let the test mount one."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("cannot run mount")
    if p.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({p.stderr.decode().strip()})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def _one_line_error(stderr: str, path: Path) -> None:
    lines = stderr.strip().splitlines()
    assert lines and lines[-1] == f"error: {path}: No space left on device", stderr
    assert "Traceback" not in stderr


@pytest.mark.slow
def test_real_full_disk(tmp_path, models, small_disk):
    """encode (safetensors), decode (Pillow), train (torch.save) and convert (a diffusers folder) on a
    full tmpfs: each stops with one line naming the file, and leaves nothing half-written."""
    src = image_folder(tmp_path / "in", 40, size=48)
    inputs = snapshot(src)
    out = small_disk / "lat"
    p = run("encode", src, "-o", out, "--model", models["kl"], "--json")  # the installed command
    s = json.loads(p.stdout)
    assert p.returncode == 1 and s["stopped"] == "disk full" and s["failed"] == 1 and 0 < s["done"] < 39, p.stderr
    assert s["failures"][0]["reason"].endswith("(No space left on device)")
    assert temporaries(out) == [] and len(finals(out, "*")) == s["done"]
    for f in finals(out, "*"):
        read_latent(f)
    assert_untouched(inputs, snapshot(src))

    for f in finals(out, "*")[1:]:  # room for a few images
        f.unlink()
    keep = finals(out, "*")[0]
    lat = tmp_path / "lat"
    assert cli("encode", src, "-o", lat, "--model", models["kl"]).exit_code == 0
    r = cli("decode", lat, "-o", small_disk / "rec", "--model", models["kl"], "--json")
    s = json.loads(r.stdout)
    assert r.exit_code == 1 and s["stopped"] == "disk full" and s["failed"] == 1, r.output
    assert temporaries(small_disk / "rec") == []
    for f in finals(small_disk / "rec", "*"):
        with Image.open(f) as im:
            im.load()

    for f in finals(small_disk / "rec", "*"):
        f.unlink()
    model = small_disk / "m" / "model.safetensors"  # its checkpoint is far larger than the disk
    r = cli("train", src, "-o", model, "--steps", 2, "--checkpoint-every", 1, *TRAIN_TINY)
    assert r.exit_code == 1, r.output
    _one_line_error(r.stderr, model.with_name(model.name + ".ckpt"))
    assert temporaries(small_disk / "m") == [] and not model.exists()

    folder = small_disk / "diffusers"
    r = cli("convert", models["kl"], "-o", folder, "--to", "diffusers")
    assert r.exit_code == 1, r.output
    _one_line_error(r.stderr, folder)
    assert not folder.exists() and temporaries(small_disk) == []
    assert keep.is_file()
