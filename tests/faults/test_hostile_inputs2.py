"""Hostile inputs, second round (issue 17, part A): manifests that name outputs outside the output
folder, tar bombs and links, huge shard counts, safetensors header bombs, inputs that used to end in
a traceback, manifest fields and collisions, and a lock file that is not a file.

Oracles: the files on disk (what exists outside the output folder, what was written inside it),
exit codes and one-line messages, and memory measured by ``tracemalloc``.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import tracemalloc
from pathlib import Path

import pytest
from _scaleout import cli

from vqcli.io import tarfiles as tario
from vqcli.io.manifest import MANIFEST
from vqcli.pipeline import shards
from vqcli.pipeline.jobs import image_jobs
from vqcli.pipeline.results import FileResult, Job, TarJob
from vqcli.pipeline.selection import Selection, select_jobs
from vqcli.pipeline.sources import member_jobs

from .conftest import image_folder, photo, write_image


def _png(size: int = 16, seed: int = 0) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(photo(size, size, seed)).save(buf, format="PNG")
    return buf.getvalue()


def _summary(r) -> dict:
    assert "Traceback" not in r.output, r.output
    return json.loads(r.stdout)


def _one_line_error(r, code: int) -> str:
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output, r.output
    text = r.output.strip()
    assert len(text.splitlines()) == 1, text
    return text


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


def _manifest(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(l) + "\n" for l in lines))
    return path


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
    return path


ESCAPES = [
    "../../ESC1.png",
    "sub/../../ESC2.png",
    "..\\..\\ESC3.png",
    "./../ESC4.png",
    "a/\u0000/ESC5.png",
    "sub/..",
    "..",
]


# --- 1. output paths only from inputs, inside the output folder ---------------------------------------


def test_manifest_rel_never_names_a_file_outside_the_output_folder(tmp_path, models):
    src = image_folder(tmp_path / "in", len(ESCAPES) + 2, size=16)
    images = sorted(src.glob("*.png"))
    lines = [{"source": str(p), "rel": rel} for p, rel in zip(images, ESCAPES)]
    lines.append({"source": str(images[-2]), "rel": str(tmp_path / "ESC_ABS.png")})  # absolute
    lines.append({"source": str(images[-1]), "rel": "ok/fine.png"})
    out = tmp_path / "work" / "out"
    out.mkdir(parents=True)
    m = _manifest(tmp_path / "m.jsonl", lines)
    before = _files(tmp_path)
    r = cli("encode", "--from-manifest", m, "-o", out, "--model", models["kl"], "--json")
    s = _summary(r)
    assert r.exit_code == 1
    assert (s["done"], s["failed"]) == (1, len(ESCAPES) + 1)
    new = _files(tmp_path) - before
    assert {n for n in new if not n.startswith("work/out/")} == set()
    assert "work/out/ok/fine.png.safetensors" in new
    for f in s["failures"]:
        assert "manifest line not used" in f["reason"] and "\n" not in f["reason"]


def test_decode_and_tar_manifest_lines_cannot_escape_either(tmp_path, models):
    src = tmp_path / "in"
    write_image(src / "a.png", photo(16, 16))
    lat = tmp_path / "lat"
    assert cli("encode", src, "-o", lat, "--model", models["kl"]).exit_code == 0
    latent = lat / "a.png.safetensors"
    out = tmp_path / "deep" / "out"
    lines = [{"source": str(latent), "rel": rel} for rel in ("../../E.png.safetensors", "x/../../../E2.png.safetensors")]
    r = cli("decode", "--from-manifest", _manifest(tmp_path / "d.jsonl", lines), "-o", out, "--json")
    assert r.exit_code == 1 and _summary(r)["failed"] == 2
    assert not list(tmp_path.glob("E*")) and not list((tmp_path / "deep").glob("E*"))

    tar = _tar(src / "t.tar", [("a.png", _png()), ("b.png", _png(seed=1))])
    tar_lines = [
        {"source": str(tar), "member": "a.png", "rel": "../../T/a.png"},  # the tar's rel leads out
        {"source": str(tar), "member": "../b.png", "rel": "t.tar/../b.png"},  # the member leads out
    ]
    m = _manifest(tmp_path / "t.jsonl", tar_lines)
    for extra in ([], ["--tar-output"]):
        out = tmp_path / f"tout{len(extra)}" / "out"
        before = _files(tmp_path)
        r = cli("encode", "--from-manifest", m, "-o", out,
                "--model", models["kl"], "--json", *extra)
        assert r.exit_code == 1, r.output
        assert {n for n in _files(tmp_path) - before if not n.startswith(f"tout{len(extra)}/out/")} == set()


def test_a_link_inside_the_output_folder_is_not_written_through(tmp_path, models):
    src = tmp_path / "in"
    write_image(src / "sub" / "a.png", photo(16, 16))
    write_image(src / "b.png", photo(16, 16, 1))
    outside, out = tmp_path / "outside", tmp_path / "out"
    outside.mkdir()
    out.mkdir()
    (out / "sub").symlink_to(outside, target_is_directory=True)
    r = cli("encode", src, "-o", out, "--model", models["kl"], "--json")
    s = _summary(r)
    assert r.exit_code == 1 and (s["done"], s["failed"]) == (1, 1)
    assert "outside" in s["failures"][0]["reason"]
    assert list(outside.iterdir()) == []


# --- 3, 4, 8. tar members: bombs, many members, links ---------------------------------------------------


def test_a_huge_tar_member_is_refused_from_its_header_before_it_is_read(tmp_path, models):
    big = tarfile.TarInfo("big.png")
    big.size = 64 * 1024 * 1024  # zeros: 64 kB once gzipped
    claims = tarfile.TarInfo("claims.png")  # a real PNG header of 300x300 with --max-pixels 10000
    wide = _png(300)
    claims.size = len(wide)
    padded = tarfile.TarInfo("padded.png")  # an 8x8 PNG followed by 16 MB: under --max-pixels' bound
    small = _png(8)  # on bytes, over what its own header allows
    padded.size = len(small) + 16 * 1024 * 1024 + 4096
    path = tmp_path / "in" / "bomb.tar.gz"
    path.parent.mkdir()
    with tarfile.open(path, "w:gz", compresslevel=1) as tf:
        tf.addfile(big, io.BytesIO(bytes(big.size)))
        tf.addfile(claims, io.BytesIO(wide))
        tf.addfile(padded, io.BytesIO(small + bytes(padded.size - len(small))))
        ok = tarfile.TarInfo("ok.png")
        data = _png(16)
        ok.size = len(data)
        tf.addfile(ok, io.BytesIO(data))
    assert path.stat().st_size < 1_000_000
    job = TarJob(path, path.parent, Path("bomb.tar.gz"), tmp_path / "o" / "bomb.tar.gz")
    tracemalloc.start()
    try:
        got = list(member_jobs(job, lambda n: n + ".safetensors", max_pixels=10_000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # none of the big members was held whole (what stays: the decompressor's output for one
    # read of the compressed stream, up to about 10 MB for zeros)
    assert peak < 30_000_000, peak
    failed = {r.input.name: r.reason for r in got if isinstance(r, FileResult)}
    assert set(failed) == {"big.png", "claims.png", "padded.png"}
    assert "not read" in failed["big.png"] and "300x300" in failed["claims.png"] and "8x8" in failed["padded.png"]
    assert [j.input.name for j in got if isinstance(j, Job)] == ["ok.png"]
    r = cli("encode", path.parent, "-o", tmp_path / "out", "--model", models["kl"], "--max-pixels", "10000", "--json")
    s = _summary(r)
    assert r.exit_code == 1 and (s["done"], s["failed"]) == (1, 3)


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name", ["k{}.txt", "k{}.png"])
def test_memory_does_not_grow_with_the_number_of_tar_members(tmp_path, name):
    def tar_of(n: int) -> Path:
        return _tar(tmp_path / f"{n}.tar", [(name.format(i), b"") for i in range(n)])

    def reads(path: Path):
        def go():
            job = TarJob(path, tmp_path, Path(path.name), tmp_path / "o" / path.name)
            for _ in member_jobs(job, lambda n: n + ".safetensors"):
                pass
            tario.count_members(path, lambda n: n.endswith(".png"))

        return go

    small, large = tar_of(1000), tar_of(6000)
    reads(small)()  # (the image plugins Pillow imports on first use)
    grown = _peak(reads(large)) - _peak(reads(small))
    # the old reader kept each member's header (about 500 bytes) and its output's name; now a
    # 64-bit digest per image member stays (to catch repeated names), nothing per other member
    assert grown / 5000 < (150 if name.endswith(".png") else 20), grown


def test_link_members_are_reported_not_dropped(tmp_path, models):
    data = _png()
    sym = tarfile.TarInfo("s.png")
    sym.type, sym.linkname = tarfile.SYMTYPE, "a.png"
    hard = tarfile.TarInfo("h.png")
    hard.type, hard.linkname = tarfile.LNKTYPE, "a.png"
    up = tarfile.TarInfo("u.png")
    up.type, up.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
    _tar(tmp_path / "in" / "t.tar", [("a.png", data), sym, hard, up]) if (tmp_path / "in").mkdir() is None else None
    r = cli("encode", tmp_path / "in", "-o", tmp_path / "out", "--model", models["kl"], "--json")
    s = _summary(r)
    assert r.exit_code == 1 and (s["total"], s["done"], s["failed"]) == (4, 1, 3)
    reasons = sorted(f["reason"] for f in s["failures"])
    assert all("link" in e and "not followed" in e for e in reasons)
    assert _files(tmp_path / "out") == {"t.tar/a.png.safetensors"}


def test_a_tar_member_2000_folders_deep_is_one_line(tmp_path, models):
    deep = "/".join(["d"] * 2000) + "/x.png"
    _tar(tmp_path / "in.tar", [(deep, _png()), ("ok.png", _png(seed=1))])
    (tmp_path / "in").mkdir()
    os.replace(tmp_path / "in.tar", tmp_path / "in" / "t.tar")
    r = cli("encode", tmp_path / "in", "-o", tmp_path / "out", "--model", models["kl"], "--json")
    s = _summary(r)
    assert r.exit_code == 1 and (s["done"], s["failed"]) == (1, 1)
    assert "folders deep" in s["failures"][0]["reason"]


# --- 5. shards ------------------------------------------------------------------------------------------


def test_shards_cover_every_input_once_whatever_the_ranks_of_each(tmp_path):
    src = image_folder(tmp_path / "in", 23, size=8, sub_every=5)
    _tar(src / "z.tar", [("a.png", _png(8))])
    out = tmp_path / "out"
    everything = sorted(str(j.input) for j in image_jobs([src], out))
    for worlds in ([1, 1, 1], [2, 3, 1], [4, 1, 2]):
        taken = []
        for i, world in enumerate(worlds):
            for rank in range(world):
                share = shards.combine(shards.Share(i, len(worlds)), rank, world)
                jobs = select_jobs(lambda: image_jobs([src], out), Selection(share=share), 2)
                taken += [str(j.input) for j in jobs if isinstance(j, Job)]
        assert sorted(taken) == everything, worlds


def test_a_twenty_digit_shard_count_runs(tmp_path, models):
    src = image_folder(tmp_path / "in", 2, size=16)
    count = 10**19 + 7
    for i in (0, 1, count - 1):
        r = cli("encode", src, "-o", tmp_path / "out", "--model", models["kl"], "--shard", f"{i}/{count}", "--json")
        assert r.exit_code == 0, r.output
        assert _summary(r)["done"] == (1 if i < 2 else 0)
    assert len(list((tmp_path / "out").glob("*.safetensors"))) == 2
    assert len(list((tmp_path / "out").glob("manifest-part-*"))) == 3  # waiting for the others


# --- 6. safetensors header bombs ------------------------------------------------------------------------


def _safetensors(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return path


def test_header_bombs_are_refused_before_parsing_through_decode_info_and_model(tmp_path, models):
    brackets = _safetensors(tmp_path / "b.safetensors", b'{"x":[' + b"[]," * 200_000 + b"[]]}")
    meta = json.dumps({"__metadata__": {"format": "vqcli.latent", "pad": "x" * 2_000_000}}).encode()
    big_latent = _safetensors(tmp_path / "big.png.safetensors", meta)
    r = cli("decode", brackets, big_latent, "-o", tmp_path / "out", "--json")
    s = _summary(r)
    assert r.exit_code == 1 and s["failed"] == 2
    errors = {Path(f["path"]).name: f["reason"] for f in s["failures"]}
    assert "brackets" in errors["b.safetensors"]
    assert "too large" in errors["big.png.safetensors"] and "1,048,576" in errors["big.png.safetensors"]
    assert "brackets" in cli("info", brackets).output
    src = image_folder(tmp_path / "in", 1, size=16)
    text = _one_line_error(cli("encode", src, "-o", tmp_path / "o2", "--model", brackets), 1)
    assert "brackets" in text


# --- 9. one line instead of a traceback -----------------------------------------------------------------


@pytest.mark.parametrize(
    "content, says",
    [
        (b'{"source": "/x/\xff\xfe.png"}\n', "not UTF-8"),
        (b"[" * 100_000 + b"\n", "nested too deep"),
        (b'{"source": "/x/a.png"}\n' + b"x" * (1024 * 1024 + 10) + b"\n", "longer than"),
    ],
)
def test_a_broken_manifest_is_one_line(tmp_path, models, content, says):
    m = tmp_path / "m.jsonl"
    m.write_bytes(content)
    text = _one_line_error(cli("encode", "--from-manifest", m, "-o", tmp_path / "out", "--model", models["kl"]), 2)
    assert says in text and f"{m}:" in text


@pytest.mark.parametrize("cls", [["AutoencoderKL"], {"AutoencoderKL": 1}, 3, None])
def test_a_diffusers_class_name_of_any_type_is_one_line(tmp_path, cls):
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": cls}))
    text = _one_line_error(cli("info", folder), 1)
    assert "AutoencoderKL and VQModel" in text


def test_a_folder_tree_1000_deep_is_walked_without_recursion(tmp_path, models):
    src, out = tmp_path / "in", tmp_path / "out"
    try:
        deep = src
        for _ in range(1000):  # (os.makedirs recurses)
            deep = deep / "d"
            deep.mkdir(parents=deep.parent == src)
        write_image(deep / "a.png", photo(16, 16))
        write_image(src / "b.png", photo(16, 16, 1))
        r = cli("encode", src, "-o", out, "--model", models["kl"], "--json")
        assert r.exit_code == 0 and _summary(r)["done"] == 2
        assert out.joinpath(*["d"] * 1000, "a.png.safetensors").is_file()
    finally:  # pytest's clean-up (shutil.rmtree) recurses: the trees go now
        subprocess.run(["rm", "-rf", str(src), str(out)], check=False)


@pytest.mark.parametrize("option", [["--ch", "100000"], ["--crop", "100000"]])
def test_train_sizes_that_cannot_be_allocated_are_one_line(tmp_path, option):
    image_folder(tmp_path / "data", 1, size=16)
    r = cli("train", tmp_path / "data", "-o", tmp_path / "m.safetensors", "--steps", "1", "--device", "cpu",
            "--ch", "32", "--ch-mult", "1,2", "--num-res-blocks", "1", "--batch-size", "1", "--no-bf16", *option)
    text = _one_line_error(r, 1)
    assert "not enough memory" in text
    assert not (tmp_path / "m.safetensors").exists()


# --- 10, 11. manifests: fields kept, checked first, collisions --------------------------------------------


def test_fields_vqcli_does_not_own_survive_a_rerun_from_the_manifest(tmp_path, models):
    src = image_folder(tmp_path / "in", 3, size=16)
    out = tmp_path / "out"
    lines = [{"source": str(p), "caption": f"a photo {i}", "label": i} for i, p in enumerate(sorted(src.glob("*.png")))]
    m = _manifest(out / MANIFEST, lines) if out.mkdir() is None else None
    r = cli("encode", "--from-manifest", m, "-o", out, "--model", models["kl"], "--json")
    assert r.exit_code == 0 and _summary(r)["done"] == 3
    got = [json.loads(l) for l in m.read_text().splitlines()]
    assert sorted((g["caption"], g["label"], g["status"]) for g in got) == [(f"a photo {i}", i, "done") for i in range(3)]


def test_an_output_manifest_that_is_not_json_is_refused_before_any_work(tmp_path, models):
    src = image_folder(tmp_path / "in", 2, size=16)
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST).write_text("this is not json\n")
    text = _one_line_error(cli("encode", src, "-o", out, "--model", models["kl"], "--manifest"), 2)
    assert MANIFEST in text and "not JSON" in text
    assert _files(out) == {MANIFEST}


def test_two_sources_with_one_rel_collide_and_two_names_from_two_folders_are_both_done(tmp_path, models):
    write_image(tmp_path / "a" / "x.png", photo(16, 16))
    write_image(tmp_path / "b" / "x.png", photo(16, 16, 1))
    given = [{"source": str(tmp_path / d / "x.png"), "rel": "same.png"} for d in "ab"]
    r = cli("encode", "--from-manifest", _manifest(tmp_path / "m1.jsonl", given), "-o", tmp_path / "o1",
            "--model", models["kl"], "--json")
    s = _summary(r)
    assert r.exit_code == 1 and (s["done"], s["failed"], s["skipped"]) == (1, 1, 0)
    assert "also the output of" in s["failures"][0]["reason"]
    bare = [{"source": str(tmp_path / d / "x.png")} for d in "ab"]
    r = cli("encode", "--from-manifest", _manifest(tmp_path / "m2.jsonl", bare), "-o", tmp_path / "o2",
            "--model", models["kl"], "--json")
    assert r.exit_code == 0 and _summary(r)["done"] == 2
    assert len(list((tmp_path / "o2").rglob("*.safetensors"))) == 2


# --- 14. the manifest's lock file ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["symlink", "fifo", "folder"])
def test_a_lock_file_that_is_not_a_file_is_not_followed_and_fails_the_run(tmp_path, models, kind):
    src = image_folder(tmp_path / "in", 1, size=16)
    out = tmp_path / "out"
    out.mkdir()
    lock = out / ".manifest.lock"
    target = tmp_path / "elsewhere" / "created-by-vqcli"
    target.parent.mkdir()
    if kind == "symlink":
        lock.symlink_to(target)
    elif kind == "fifo":
        os.mkfifo(lock)
    else:
        lock.mkdir()
    r = cli("encode", src, "-o", out, "--model", models["kl"], "--manifest")
    assert r.exit_code == 1, r.output
    assert "cannot write the manifest" in r.output and "Traceback" not in r.output
    assert not target.exists()
    assert (out / "000.png.safetensors").is_file()
