"""WebDataset-style tar shards: images read from inside tars, latents written into tars.

Oracles: the same images as loose files through the same command (their latents), Pillow via
``images.load_image`` on the same bytes written to a file, and Python's tarfile reading the
output tars back.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch
from _scaleout import (
    TREE,
    cli,
    encoded,
    latents,
    make_tar,
    make_tree,
    manifest_lines,
    photo,
    read_latent,
    save_model,
)
from PIL import Image
from safetensors.torch import load as load_safetensors

from vqcli.errors import FileError
from vqcli.io import tarfiles as tario
from vqcli.io.images import load_image, load_image_bytes
from vqcli.pipeline.pictures import side_by_side


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("model") / "kl.safetensors")


@pytest.fixture
def shard(tmp_path) -> Path:
    """The TREE images inside one tar, in WebDataset style: with .json and .cls companions and a
    folder entry, which are skipped."""
    members = {}
    for seed, rel in enumerate(TREE, 1):
        members[rel] = encoded(rel, seed)
        members[Path(rel).with_suffix(".json").as_posix()] = b'{"caption": "x"}'
    members["a.cls"] = b"3"
    path = make_tar(tmp_path / "shards" / "shard-000.tar", members)
    with tarfile.open(path, "a") as tf:
        tf.addfile(tarfile.TarInfo("emptydir/"))
    return path


def test_tar_input_gives_the_same_latents_as_the_same_images_as_files(tmp_path, model, shard):
    files = make_tree(tmp_path / "files")
    assert cli("encode", files, "-o", tmp_path / "from-files", "--model", model).exit_code == 0
    r = cli("encode", shard.parent, "-o", tmp_path / "from-tar", "--model", model, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["done"] == len(TREE)
    want = latents(tmp_path / "from-files")
    got = latents(tmp_path / "from-tar" / "shard-000.tar")
    assert got.keys() == want.keys() == {f"{rel}.safetensors" for rel in TREE}
    for k in want:
        assert torch.equal(got[k], want[k]), k
    _, meta = read_latent(tmp_path / "from-tar" / "shard-000.tar" / "sub" / "deep" / "d.png.safetensors")
    assert meta["source"] == "shard-000.tar/sub/deep/d.png" and (meta["height"], meta["width"]) == ("9", "40")
    # resumed: every member found again, nothing redone
    r = cli("encode", shard, "-o", tmp_path / "from-tar", "--model", model, "--json")
    assert (json.loads(r.stdout)["skipped"], json.loads(r.stdout)["done"]) == (len(TREE), 0)


def test_tar_output_holds_each_latent_as_a_member(tmp_path, model, shard):
    out = tmp_path / "out"
    assert cli("encode", shard, "-o", tmp_path / "folder", "--model", model).exit_code == 0
    r = cli("encode", shard, "-o", out, "--model", model, "--tar-output", "--manifest", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["done"] == len(TREE)
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == ["manifest.jsonl", "shard-000.tar"]
    want = latents(tmp_path / "folder" / "shard-000.tar")
    with tarfile.open(out / "shard-000.tar") as tf:
        assert tf.pax_headers.get("VQCLI.software") == "vqcli"
        infos = tf.getmembers()
        assert sorted(i.name for i in infos) == sorted(want)
        for info in infos:
            assert info.mtime == 1_700_000_000 and info.mode == 0o644
            tensors = load_safetensors(tf.extractfile(info).read())
            assert torch.equal(tensors["latent"], want[info.name]), info.name
    lines = manifest_lines(out / "manifest.jsonl")
    assert {(l["member"], l["output"], l["status"]) for l in lines} == {
        (rel, f"shard-000.tar/{rel}.safetensors", "done") for rel in TREE
    }
    assert all(l["source"] == str(shard) and l["rel"] == f"shard-000.tar/{l['member']}" for l in lines)
    # an output tar that exists is skipped whole, replaced with --overwrite, never if it is not vqcli's
    r = cli("encode", shard, "-o", out, "--model", model, "--tar-output", "--json")
    assert (json.loads(r.stdout)["skipped"], json.loads(r.stdout)["total"]) == (1, 1)
    r = cli("encode", shard, "-o", out, "--model", model, "--tar-output", "--overwrite", "--json")
    assert json.loads(r.stdout)["done"] == len(TREE)
    foreign = make_tar(tmp_path / "other" / "shard-000.tar", {"x.txt": b"someone's"})
    r = cli("encode", shard, "-o", foreign.parent, "--model", model, "--tar-output")
    assert r.exit_code == 1 and "not written by vqcli" in r.stderr
    with tarfile.open(foreign) as tf:
        assert tf.getnames() == ["x.txt"]


def test_bad_members_fail_alone_and_nothing_is_written_outside(tmp_path, model):
    good = encoded("a.png", 1)
    tar = make_tar(
        tmp_path / "in" / "s.tar",
        {"good.png": good, "bad.png": b"not a png", "../evil.png": good, "/abs.png": good, "dup.png": good},
    )
    with tarfile.open(tar, "a") as tf:  # a second member of the same name
        info = tarfile.TarInfo("dup.png")
        info.size = len(good)
        tf.addfile(info, io.BytesIO(good))
    out = tmp_path / "out"
    r = cli("encode", tar, "-o", out, "--model", model, "--json")
    assert r.exit_code == 1
    s = json.loads(r.stdout)
    assert (s["done"], s["failed"]) == (2, 4)
    reasons = {Path(f["path"]).relative_to(tmp_path / "in").as_posix(): f["reason"] for f in s["failures"]}
    assert "bad.png" in "".join(reasons) and "image" in reasons["s.tar/bad.png"]
    assert "leads out" in reasons["s.tar/../evil.png"]
    assert "absolute" in next(v for k, v in reasons.items() if k.endswith("abs.png"))
    assert "same name" in reasons["s.tar/dup.png"]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.safetensors")) == [
        "out/s.tar/dup.png.safetensors",
        "out/s.tar/good.png.safetensors",
    ]


def test_a_damaged_tar_fails_after_the_members_before_the_damage(tmp_path, model):
    whole = make_tar(tmp_path / "whole.tar", {f"m{i}.png": encoded("g/h.png", i + 1) for i in range(3)})
    data = whole.read_bytes()
    cut = tmp_path / "in" / "cut.tar"
    cut.parent.mkdir()
    second = data.index(b"m1.png")
    cut.write_bytes(data[: second + 512 + 100])  # the second member's header and part of its data
    r = cli("encode", cut, "-o", tmp_path / "out", "--model", model, "--json")
    assert r.exit_code == 1
    s = json.loads(r.stdout)
    assert s["done"] == 1 and s["failures"] == [{"path": str(cut), "reason": "cannot read tar (unexpected end of data)"}]


def test_from_manifest_redoes_only_the_failed_members(tmp_path, model):
    members = {f"k{i}.png": encoded("a.png", i + 1) for i in range(3)}
    tar = make_tar(tmp_path / "in" / "s.tar", {**members, "k1.png": b"broken"})
    out = tmp_path / "out"
    assert cli("encode", tar, "-o", out, "--model", model, "--manifest").exit_code == 1
    make_tar(tar, members)  # the shard is repaired
    r = cli("encode", "--from-manifest", out / "manifest.jsonl", "-o", out, "--model", model, "--json")
    assert r.exit_code == 0, r.output
    assert (json.loads(r.stdout)["done"], json.loads(r.stdout)["total"]) == (1, 1)
    assert {(l["member"], l["status"]) for l in manifest_lines(out / "manifest.jsonl")} == {
        ("k0.png", "done"), ("k1.png", "done"), ("k2.png", "done")
    }


def test_from_manifest_rebuilds_an_output_tar_with_failures(tmp_path, model):
    members = {f"k{i}.png": encoded("a.png", i + 1) for i in range(3)}
    tar = make_tar(tmp_path / "in" / "s.tar.gz", {})
    with tarfile.open(tar, "w:gz") as tf:  # compressed input: read as a stream, output plain
        for name, data in {**members, "k1.png": b"broken"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    assert cli("encode", tar, "-o", out, "--model", model, "--tar-output", "--manifest").exit_code == 1
    with tarfile.open(out / "s.tar") as tf:
        assert sorted(tf.getnames()) == ["k0.png.safetensors", "k2.png.safetensors"]
    with tarfile.open(tar, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    r = cli("encode", "--from-manifest", out / "manifest.jsonl", "-o", out, "--model", model, "--tar-output", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["done"] == 3  # the shard is made again, whole
    with tarfile.open(out / "s.tar") as tf:
        assert sorted(tf.getnames()) == ["k0.png.safetensors", "k1.png.safetensors", "k2.png.safetensors"]


def test_roundtrip_reads_tar_shards(tmp_path, model):
    tar = make_tar(tmp_path / "in" / "s.tar", {"d/k.png": encoded("a.png", 1)})
    r = cli("roundtrip", tar, "-o", tmp_path / "out", "--model", model, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["images"][0]["path"] == str(tar / "d" / "k.png")
    blank = np.zeros((17, 33, 3), dtype=np.uint8)  # (the labelled picture of a 33x17 image has this size)
    expected = side_by_side(blank, blank, 30.0, 0.9, 1.0).shape[1::-1]
    assert Image.open(tmp_path / "out" / "s.tar" / "d" / "k.png.roundtrip.png").size == expected


# --- decoding members like files ------------------------------------------------------------------


def _variants(tmp_path: Path) -> dict[str, Path]:
    """Images whose reading has rules: transparency, 16-bit grey, EXIF orientation, palette."""
    rgb = photo(20, 30, 7)
    d = {}
    rgba = np.dstack([rgb, (np.arange(600).reshape(20, 30) % 256).astype(np.uint8)])
    d["rgba.png"] = rgba
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray((np.arange(600).reshape(20, 30) * 100).astype(np.uint16)).save(tmp_path / "grey16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(rgb).save(tmp_path / "rotated.jpg", exif=exif, quality=90)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "palette.gif", transparency=0)
    return {name: tmp_path / name for name in ["rgba.png", "grey16.png", "rotated.jpg", "palette.gif"]}


def test_member_bytes_decode_exactly_like_the_file(tmp_path):
    for name, path in _variants(tmp_path).items():
        want = load_image(path)
        got = load_image_bytes(path.read_bytes(), Path("s.tar") / name)
        assert got.dtype == want.dtype and np.array_equal(got, want), name
    assert load_image(tmp_path / "rotated.jpg").shape == (30, 20, 3)


def test_member_errors_name_the_member(tmp_path):
    path = Path("s.tar/k.png")
    with pytest.raises(FileError) as e:
        load_image_bytes(b"garbage", path)
    assert Path(e.value.path) == path
    big = io.BytesIO()
    Image.fromarray(photo(40, 40)).save(big, format="PNG")
    with pytest.raises(FileError, match="over the limit of 100") as e:
        load_image_bytes(big.getvalue(), path, max_pixels=100)
    assert Path(e.value.path) == path


def test_member_names_are_normalised_or_refused():
    assert tario.member_name("./a/b.jpg") == (PurePosixPath("a/b.jpg"), "")
    assert "leads out of its folder" in tario.member_name("a/../../b.jpg")[1]
    assert "is an absolute path" in tario.member_name("/etc/x.jpg")[1]
    assert "backslash" in tario.member_name("..\\x.jpg")[1]
    assert tario.plain_name("s.tar.gz") == "s.tar" and tario.plain_name("s.tgz") == "s.tar" and tario.plain_name("s.tar") == "s.tar"
    assert tario.is_tar_path("x/S.TAR") and not tario.is_tar_path("x.tar.png")
