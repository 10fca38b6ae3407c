"""OUT/manifest.jsonl, --shard pieces and --from-manifest, through the CLI (one process per shard).

Oracles: the files on disk (sizes from os.stat, outputs that exist), a single unsharded run's
tensors, and the manifest rules spelled out in each test.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from _scaleout import (
    TREE,
    cli,
    latents,
    make_tree,
    manifest_lines,
    same_tensors,
    save_model,
)

from vqcli.io import manifest as mf


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("model") / "kl.safetensors")


@pytest.fixture
def tree(tmp_path) -> Path:
    root = make_tree(tmp_path / "in")
    (root / "g" / "broken.png").write_bytes(b"not a png")
    return root


def _check_manifest(out: Path, root: Path, broken: bool = True) -> list[dict]:
    """Every input once, with its real size; done lines name an output that exists."""
    lines = manifest_lines(out / mf.MANIFEST)
    assert [(l["source"], l["member"] or "") for l in lines] == sorted((l["source"], l["member"] or "") for l in lines)
    expected = sorted([*TREE, "g/broken.png"])
    assert sorted(l["rel"] for l in lines) == expected
    for l in lines:
        src = Path(l["source"])
        assert src.is_absolute() and src == (root / l["rel"]).absolute()
        assert l["bytes"] == src.stat().st_size
        assert l["output"] == l["rel"] + ".safetensors"
        if l["rel"] == "g/broken.png" and broken:
            assert l["status"] == "failed" and l["error"]
        else:
            assert l["status"] in ("done", "skipped") and l["error"] is None
            assert (out / l["output"]).is_file()
    assert not list(out.glob("manifest-part-*")) and not list(out.glob(".vqcli-tmp-*"))
    return lines


def test_manifest_lists_every_input_once_with_status_size_and_error(tmp_path, model, tree):
    out = tmp_path / "out"
    r = cli("encode", tree, "-o", out, "--model", model, "--manifest", "--json")
    assert r.exit_code == 1, r.output
    summary = json.loads(r.stdout)
    assert summary["manifest"] == {"path": str(out / "manifest.jsonl"), "merged": True, "lines": 9, "waiting_for_parts": []}
    lines = _check_manifest(out, tree)
    assert [l["status"] for l in lines].count("done") == 8


def test_no_manifest_unless_asked_for_a_plain_run(tmp_path, model, tree):
    out = tmp_path / "out"
    assert cli("encode", tree / "a.png", "-o", out, "--model", model).exit_code == 0
    assert not (out / mf.MANIFEST).exists()
    assert cli("encode", tree / "a.png", "-o", out, "--model", model, "--shard", "0/1", "--no-manifest").exit_code == 0
    assert not (out / mf.MANIFEST).exists()


@pytest.mark.slow
def test_shards_together_are_the_whole_exactly_once(tmp_path, model, tree):
    (tree / "g" / "broken.png").unlink()
    whole = tmp_path / "whole"
    assert cli("encode", tree, "-o", whole, "--model", model).exit_code == 0
    out = tmp_path / "pieces"
    dones = []
    for i in range(3):
        r = cli("encode", tree, "-o", out, "--model", model, "--shard", f"{i}/3", "--json")
        assert r.exit_code == 0, r.output
        s = json.loads(r.stdout)
        dones.append(s["done"])
        assert s["shard"] == f"{i}/3" and s["failed"] == 0 and s["skipped"] == 0
        # the manifest appears with the last part, not before
        assert s["manifest"]["merged"] == (i == 2)
        assert s["manifest"]["waiting_for_parts"] == ([] if i == 2 else list(range(i + 1, 3)))
        assert (out / "manifest.jsonl").exists() == (i == 2)
    assert sum(dones) == len(TREE) and all(d > 0 for d in dones)
    assert same_tensors(latents(out), latents(whole))
    lines = manifest_lines(out / "manifest.jsonl")
    assert sorted(l["rel"] for l in lines) == sorted(TREE) and {l["status"] for l in lines} == {"done"}


def test_shard_parts_wait_for_each_other_and_any_order_merges(tmp_path, model, tree):
    out = tmp_path / "out"
    r = cli("encode", tree, "-o", out, "--model", model, "--shard", "1/2")
    assert r.exit_code in (0, 1)
    assert "made when all 2 parts are there (waiting for: 0)" in r.stderr
    assert (out / "manifest-part-1-of-2.jsonl").exists() and not (out / "manifest.jsonl").exists()
    cli("encode", tree, "-o", out, "--model", model, "--shard", "0/2")
    assert not list(out.glob("manifest-part-*"))
    _check_manifest(out, tree)


def test_from_manifest_redoes_only_failed_and_missing(tmp_path, model, tree):
    out = tmp_path / "out"
    assert cli("encode", tree, "-o", out, "--model", model, "--manifest").exit_code == 1
    # the broken image is repaired, an output is lost
    (tree / "g" / "broken.png").write_bytes((tree / "a.png").read_bytes())
    (out / "sub" / "c.png.safetensors").unlink()
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*.safetensors")}
    time.sleep(0.01)
    r = cli("encode", "--from-manifest", out / "manifest.jsonl", "-o", out, "--model", model, "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert (s["done"], s["skipped"], s["failed"]) == (2, 0, 0)
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*.safetensors")}
    assert set(after) == set(before) | {out / "sub" / "c.png.safetensors", out / "g" / "broken.png.safetensors"}
    assert all(after[p] == before[p] for p in before)  # the others untouched
    lines = _check_manifest(out, tree, broken=False)
    status = {l["rel"]: l["status"] for l in lines}
    assert status["g/broken.png"] == "done" and status["sub/c.png"] == "done"
    # nothing left to do
    r = cli("encode", "--from-manifest", out / "manifest.jsonl", "-o", out, "--model", model, "--json")
    assert json.loads(r.stdout)["total"] == 0


def test_from_manifest_of_another_tool_lists_sources_only(tmp_path, model, tree):
    listing = tmp_path / "list.jsonl"
    listing.write_text("".join(json.dumps({"source": str(tree / rel)}) + "\n" for rel in ["b.jpg", "g/h.png"]))
    out = tmp_path / "out"
    r = cli("encode", "--from-manifest", listing, "-o", out, "--model", model, "--json")
    assert r.exit_code == 0, r.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.safetensors")) == ["b.jpg.safetensors", "h.png.safetensors"]
    assert sorted(l["rel"] for l in manifest_lines(out / "manifest.jsonl")) == ["b.jpg", "h.png"]


def test_from_manifest_and_inputs_errors(tmp_path, model, tree):
    out = tmp_path / "out"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "/x.png"}\nnot json\n')
    r = cli("encode", "--from-manifest", bad, "-o", out, "--model", model)
    assert r.exit_code == 2 and f"{bad}:2: not JSON" in r.stderr
    r = cli("encode", tree, "--from-manifest", bad, "-o", out, "--model", model)
    assert r.exit_code == 2 and "either INPUT... or --from-manifest" in r.stderr
    r = cli("encode", "--from-manifest", tmp_path / "missing.jsonl", "-o", out, "--model", model)
    assert r.exit_code == 2 and "no such manifest" in r.stderr
    r = cli("encode", "-o", out, "--model", model)
    assert r.exit_code == 2 and "no inputs" in r.stderr
    r = cli("encode", tree, "-o", out, "--model", model, "--shard", "2/2")
    assert r.exit_code == 2 and "--shard" in r.stderr
    r = cli("encode", tree, "-o", out, "--model", model, "--shard", "0/2", "--sample")
    assert r.exit_code == 2 and "--seed" in r.stderr


# --- the merge rules, on the module ---------------------------------------------------------------


def _entry(source, status="done", member=None, error=None):
    return mf.Entry(source, member, Path(source).name, Path(source).name + ".safetensors", 1, status, error)


def _write_part(out: Path, index: int, count: int, entries, inputs="same"):
    rec = mf.Recorder(out, index, count)
    for e in entries:
        rec.add(e)
    return rec.finish(inputs)


def test_merge_updates_the_old_manifest(tmp_path):
    out = tmp_path / "out"
    _write_part(out, 0, 1, [_entry("/d/a.png"), _entry("/d/b.png", "failed", error="bad"), _entry("/d/c.png")])
    # a later run: b now done, a only seen as existing, c not in this run, d new
    merged = _write_part(out, 0, 1, [_entry("/d/b.png"), _entry("/d/a.png", "skipped"), _entry("/d/d.png")])
    assert merged.merged and merged.lines == 4
    got = {(l["source"], l["status"]) for l in manifest_lines(out / "manifest.jsonl")}
    assert got == {("/d/a.png", "done"), ("/d/b.png", "done"), ("/d/c.png", "done"), ("/d/d.png", "done")}


def test_merge_takes_a_manifest_that_is_not_sorted_and_keeps_tar_members_apart(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    lines = [_entry("/d/z.png"), _entry("/d/s.tar", member="k2.png"), _entry("/d/s.tar", member="k1.png"), _entry("/d/a.png")]
    (out / "manifest.jsonl").write_text("".join(e.line() + "\n" for e in lines))
    _write_part(out, 0, 1, [_entry("/d/s.tar", "failed", member="k1.png", error="broken")])
    got = [(l["source"], l["member"], l["status"]) for l in manifest_lines(out / "manifest.jsonl")]
    assert got == [
        ("/d/a.png", None, "done"),
        ("/d/s.tar", "k1.png", "failed"),
        ("/d/s.tar", "k2.png", "done"),
        ("/d/z.png", None, "done"),
    ]


def test_parts_of_different_input_lists_merge_with_a_warning(tmp_path):
    out = tmp_path / "out"
    assert not _write_part(out, 0, 2, [_entry("/d/a.png")], inputs="one").merged
    merged = _write_part(out, 1, 2, [_entry("/d/b.png")], inputs="other")
    assert merged.merged and "different lists of inputs" in merged.warning


def test_read_entries_validates_each_line(tmp_path):
    p = tmp_path / "m.jsonl"
    for text, message in [
        ('{"rel": "a"}', "'source' path"),
        ('{"source": "/a", "status": "maybe"}', "unknown status"),
        ('{"source": "/a", "bytes": -1}', "'bytes'"),
        ('[1, 2]', "'source' path"),
    ]:
        p.write_text(text + "\n")
        with pytest.raises(mf.UsageError, match=message):
            list(mf.read_entries(p))
    p.write_text('{"source": "/d/x.png"}\n\n')
    (e,) = mf.read_entries(p)
    assert (e.rel, e.status, e.member) == ("x.png", None, None)


def test_an_interrupted_writer_leaves_no_part(tmp_path):
    """A part appears whole or not at all: only ``finish`` puts it in place."""
    out = tmp_path / "out"
    rec = mf.Recorder(out, 0, 2)
    rec.add(_entry("/d/a.png"))
    assert not list(out.glob("manifest-part-*"))
    rec.finish()
    assert [p.name for p in out.glob("manifest-part-*")] == ["manifest-part-0-of-2.jsonl"]
    assert os.path.getsize(out / "manifest-part-0-of-2.jsonl") > 0


def test_decode_shards_and_from_manifest(tmp_path, model, tree):
    (tree / "g" / "broken.png").unlink()
    lat = tmp_path / "lat"
    assert cli("encode", tree, "-o", lat, "--model", model).exit_code == 0
    rec = tmp_path / "rec"
    done = 0
    for i in range(2):
        r = cli("decode", lat, "-o", rec, "--model", model, "--shard", f"{i}/2", "--json")
        assert r.exit_code == 0, r.output
        done += json.loads(r.stdout)["done"]
    assert done == len(TREE)
    lines = manifest_lines(rec / "manifest.jsonl")
    assert sorted(l["output"] for l in lines) == sorted(
        rel if rel.endswith(".png") else f"{rel}.png" for rel in TREE
    )
    (rec / "g" / "h.png").unlink()
    r = cli("decode", "--from-manifest", rec / "manifest.jsonl", "-o", rec, "--model", model, "--json")
    assert r.exit_code == 0, r.output
    assert (json.loads(r.stdout)["done"], json.loads(r.stdout)["total"]) == (1, 1)
    assert (rec / "g" / "h.png").is_file()
