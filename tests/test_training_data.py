"""scripts/get_training_data.sh and its helper: on a small .deb built here (no network), the
manifest matches the files collected, licences come from the package's copyright file, and a file
whose hash differs from the manifest is refused with one line and exit status 1."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from _scripts import load_script
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "get_training_data.sh"

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")

COPYRIGHT = """\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: fake

Files: *
Copyright: 2020 Default Holder
License: GPL-2+

Files: art/Lake*.jpg
       art/Other.png
Copyright: 2021, Ada Photographer <ada@example.org>
License: CC-BY-SA-4.0
"""


def _image(path: Path, size: tuple[int, int], seed: int, alpha: int | None = None) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if alpha is not None:
        image.putalpha(alpha)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _fake_deb(tmp_path: Path) -> Path:
    pkg = tmp_path / "pkg"
    art = pkg / "usr/share/backgrounds/art"
    _image(art / "Lake.jpg", (640, 520), 0)
    _image(art / "Lake_1280x1040.jpg", (1280, 1040), 1)  # the same artwork, larger: kept instead
    _image(art / "Other.png", (600, 600), 2)
    _image(art / "Plain.png", (700, 512), 3)
    _image(art / "Tiny.png", (256, 256), 4)  # too small
    _image(art / "Overlay.png", (800, 600), 5, alpha=40)  # mostly transparent
    _image(art / "screenshot.png", (800, 600), 6)  # a preview
    os.symlink("Other.png", art / "Link.png")  # a link to a file already taken
    doc = pkg / "usr/share/doc/fake-wallpapers"
    doc.mkdir(parents=True)
    (doc / "copyright").write_text(COPYRIGHT)
    (pkg / "DEBIAN").mkdir()
    (pkg / "DEBIAN/control").write_text(
        "Package: fake-wallpapers\nVersion: 1.2-3\nArchitecture: all\nMaintainer: t <t@example.org>\nDescription: test\n"
    )
    debs = tmp_path / "debs"
    debs.mkdir()
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(pkg), str(debs / "fake.deb")], check=True, capture_output=True)
    return debs


def _run(*args: str, debs: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if debs is not None:
        env["DEBS"] = str(debs)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env)


def test_manifest_matches_the_files_and_licences(tmp_path):
    debs = _fake_deb(tmp_path)
    out = tmp_path / "data"
    result = _run(str(out), debs=debs)
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    fake = {Path(e["file"]).name: e for e in entries if e["package"] == "fake-wallpapers"}
    assert sorted(fake) == ["fake-wallpapers__Lake.jpg", "fake-wallpapers__Other.png", "fake-wallpapers__Plain.png"]
    lake = fake["fake-wallpapers__Lake.jpg"]
    assert lake["source"].endswith("art/Lake_1280x1040.jpg") and (lake["width"], lake["height"]) == (1280, 1040)
    assert lake["licence"] == "CC-BY-SA-4.0" and "Ada Photographer" in lake["copyright"]
    assert fake["fake-wallpapers__Plain.png"]["licence"] == "GPL-2+"
    assert fake["fake-wallpapers__Plain.png"]["copyright"] == "2020 Default Holder"
    assert all(e["version"] == "1.2-3" for e in fake.values())
    for e in entries:  # every file there, byte for byte what the manifest says
        assert hashlib.sha256((out / e["file"]).read_bytes()).hexdigest() == e["sha256"]
    assert {e["package"] for e in entries} == {"fake-wallpapers", "scikit-image"}
    names = {Path(e["file"]).name for e in entries}
    assert "skimage__chelsea.png" in names
    assert not any(n in names for n in ("skimage__astronaut.png", "skimage__camera.png", "skimage__coffee.png"))

    again = _run(str(out), debs=debs)  # a re-run checks and keeps what is there
    assert again.returncode == 0, again.stderr
    assert _run("--verify", str(out)).returncode == 0


def test_a_file_whose_hash_differs_is_refused(tmp_path):
    debs = _fake_deb(tmp_path)
    out = tmp_path / "data"
    assert _run(str(out), debs=debs).returncode == 0
    victim = out / "train" / "fake-wallpapers__Other.png"
    victim.write_bytes(victim.read_bytes() + b"tampered")
    for result in (_run("--verify", str(out)), _run(str(out), debs=debs)):
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and str(victim) in lines[0] and "differs from the manifest" in lines[0]
        assert "Traceback" not in result.stderr


def test_a_changed_package_file_is_refused(tmp_path):
    """The manifest pins each file: a package that now ships other bytes under the same name is refused."""
    debs = _fake_deb(tmp_path)
    out = tmp_path / "data"
    assert _run(str(out), debs=debs).returncode == 0
    manifest = out / "manifest.jsonl"
    entries = [json.loads(line) for line in manifest.read_text().splitlines()]
    for e in entries:
        if e["file"].endswith("Plain.png"):
            e["sha256"] = "0" * 64
    manifest.write_text("".join(json.dumps(e) + "\n" for e in entries))
    result = _run(str(out), debs=debs)
    assert result.returncode == 1 and "Plain.png" in result.stderr and "000000000000" in result.stderr


def test_gnome_style_free_form_copyright():
    helper = load_script("scripts/training_data.py")
    text = """Copyright:
    Copyright © 2011 Someone

Image Authors:

 - adwaita*
 - Other.jpg:
   Copyright © 2011 Jakub Steiner <jimmac@gmail.com>
   Licensed under Creative Commons Attribution-ShareAlike 3.0 License.

   This package is free software; you can redistribute it under the terms of the GNU General
   Public License as published by the Free Software Foundation; either version 2 of the License
"""
    assert helper.licence_for(text, "usr/share/backgrounds/gnome/adwaita-d.webp", "g")[0] == "CC-BY-SA-3.0"
    licence, holders = helper.licence_for(text, "usr/share/backgrounds/gnome/grid-d.webp", "g")
    assert licence.startswith("GPL-2+") and holders == "g upstream authors"
