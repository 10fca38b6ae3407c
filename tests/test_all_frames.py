"""``encode --all-frames``: a latent per frame of an animated image (GIF, APNG), each equal to the
latent of that frame encoded as a still image (the frame as Pillow composites it: the oracle),
named so they sort, described in their metadata, bounded (--max-frames), failing per frame, resumable."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence
from typer.testing import CliRunner

from vqcli import AutoEncoder, AutoEncoderConfig
from vqcli.checkpoints.native import save_native
from vqcli.cli import app
from vqcli.io.latents import read_latent
from vqcli.pipeline.frames import frame_jobs, frame_name
from vqcli.pipeline.results import FileResult, Job

runner = CliRunner()
KL = AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)
COLOURS = [(230, 20, 20), (20, 200, 40), (30, 40, 220)]
DURATIONS = [100, 200, 300]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "kl.safetensors"
    save_native(AutoEncoder(KL), path)
    return path


def _frames(n: int = 3) -> list[Image.Image]:
    """A grey canvas with a square of another colour moving right: GIF and APNG store the later
    frames as the rectangle that changed, so reading them whole needs compositing."""
    out = []
    for i in range(n):
        a = np.full((20, 26, 3), 180, np.uint8)
        a[4:12, 5 * i : 5 * i + 8] = COLOURS[i % len(COLOURS)]
        a[15:, :] = (i * 37) % 256  # a band of its own per frame: consecutive frames never equal
        out.append(Image.fromarray(a))
    return out


def _save(path: Path, frames: list[Image.Image], durations=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations or 100, loop=0)
    return path


def _encode(model_path, *args: str):
    return runner.invoke(app, ["encode", *args, "--model", str(model_path)])


def _oracle_latents(tmp_path: Path, model_path, source: Path) -> list[torch.Tensor]:
    """Each frame as Pillow composites it (ImageSequence, convert RGB) saved as a PNG and encoded alone."""
    stills = tmp_path / "stills"
    stills.mkdir()
    with Image.open(source) as im:
        for i, frame in enumerate(ImageSequence.Iterator(im)):
            frame.convert("RGB").save(stills / f"f{i}.png")
    r = _encode(model_path, str(stills), "-o", str(tmp_path / "stills_out"), "-q")
    assert r.exit_code == 0, r.output
    return [read_latent(tmp_path / "stills_out" / f"f{i}.png.safetensors").tensor for i in range(len(list(stills.iterdir())))]


@pytest.mark.parametrize("ext", ["gif", "png"])
def test_each_frame_is_its_own_latent_equal_to_the_frame_encoded_alone(tmp_path, model_path, ext):
    source = _save(tmp_path / "in" / f"anim.{ext}", _frames(), DURATIONS)
    r = _encode(model_path, str(tmp_path / "in"), "-o", str(tmp_path / "lat"), "--all-frames", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert (summary["total"], summary["done"]) == (3, 3)
    names = sorted(p.name for p in (tmp_path / "lat").iterdir())
    assert names == [f"anim.{ext}.frame{i:04d}.safetensors" for i in range(3)]
    oracle = _oracle_latents(tmp_path, model_path, source)
    assert not torch.equal(oracle[0], oracle[1])  # the frames differ
    for i, name in enumerate(names):
        latent = read_latent(tmp_path / "lat" / name)
        assert torch.equal(latent.tensor, oracle[i])
        assert latent.meta.frame == (i, 3)
        assert latent.meta.frame_duration_ms == DURATIONS[i]
        assert latent.meta.source == f"anim.{ext}"
    r = runner.invoke(app, ["info", str(tmp_path / "lat" / names[1]), "--json"])
    (described,) = json.loads(r.stdout)["files"]
    assert (described["frame"], described["frames"], described["frame_duration_ms"]) == (1, 3, DURATIONS[1])
    r = runner.invoke(app, ["decode", str(tmp_path / "lat"), "-o", str(tmp_path / "dec"), "-q", "--model", str(model_path)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "dec").iterdir()) == [f"anim.{ext}.frame{i:04d}.png" for i in range(3)]
    assert Image.open(tmp_path / "dec" / f"anim.{ext}.frame0002.png").size == (26, 20)


def test_a_still_image_gives_the_same_file_as_without_all_frames(tmp_path, model_path):
    _frames()[1].save(tmp_path / "still.png")
    for out, extra in (("a", []), ("b", ["--all-frames"])):
        r = _encode(model_path, str(tmp_path / "still.png"), "-o", str(tmp_path / out), "-q", *extra)
        assert r.exit_code == 0, r.output
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["still.png.safetensors"]
    assert (tmp_path / "a" / "still.png.safetensors").read_bytes() == (tmp_path / "b" / "still.png.safetensors").read_bytes()
    r = _encode(model_path, str(tmp_path / "still.png"), "-o", str(tmp_path / "a"), "--all-frames", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["skipped"] == 1  # the same output: kept


def test_max_frames_refuses_the_file_before_any_frame_and_others_go_on(tmp_path, model_path):
    _save(tmp_path / "in" / "anim.gif", _frames())
    _frames()[0].save(tmp_path / "in" / "still.png")
    r = _encode(model_path, str(tmp_path / "in"), "-o", str(tmp_path / "lat"), "--all-frames", "--max-frames", "2")
    assert r.exit_code == 1
    lines = [line for line in r.stderr.splitlines() if "anim.gif" in line]
    assert lines == [f"{tmp_path / 'in' / 'anim.gif'}: 3 frames, over the limit of --max-frames 2; raise it with --max-frames (0: no limit)"]
    assert [p.name for p in (tmp_path / "lat").iterdir()] == ["still.png.safetensors"]
    r = _encode(model_path, str(tmp_path / "in"), "-o", str(tmp_path / "lat"), "--all-frames", "--max-frames", "0", "-q")
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "lat").glob("anim.gif.frame*.safetensors"))) == 3


def test_many_frames_are_counted_not_decoded(tmp_path):
    """A file of 3,000 frames over the default limit fails from its count: no frame decoded."""
    frames = [Image.new("L", (4, 4), 255 * (i % 2)) for i in range(3000)]
    source = _save(tmp_path / "many.gif", frames)
    job = Job(source, tmp_path, Path("many.gif"), tmp_path / "out" / "many.gif.safetensors")
    results = list(frame_jobs([job], str, max_frames=1000))
    assert len(results) == 1 and isinstance(results[0], FileResult)
    assert results[0].reason.startswith("3,000 frames, over the limit of --max-frames 1,000")
    # within the limit, frames come one at a time as they are drawn
    stream = frame_jobs([job], lambda n: n + ".safetensors", max_frames=None)
    first = next(stream)
    assert first.frame.index == 0 and first.frame.count == 3000 and first.output.name == "many.gif.frame0000.safetensors"
    stream.close()


def test_frame_names_sort_and_widen_past_ten_thousand():
    assert frame_name("a.gif", 7, 10) == "a.gif.frame0007"
    assert frame_name("a.gif", 7, 12_000) == "a.gif.frame00007"
    names = [frame_name("a.gif", i, 12_000) for i in (2, 10, 9999, 10000)]
    assert names == sorted(names)


def test_a_damaged_frame_fails_naming_it_and_earlier_frames_are_kept(tmp_path, model_path):
    data = io.BytesIO()
    _frames()[0].save(data, format="GIF", save_all=True, append_images=_frames()[1:], duration=100)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "anim.gif").write_bytes(data.getvalue()[:-30])  # the last frame cut short
    r = _encode(model_path, str(tmp_path / "in"), "-o", str(tmp_path / "lat"), "--all-frames")
    assert r.exit_code == 1
    failed = [line for line in r.stderr.splitlines() if "anim.gif" in line]
    assert len(failed) == 1 and failed[0].startswith(f"{tmp_path / 'in' / 'anim.gif'}: frame 2 of 3: cannot decode image (")
    assert sorted(p.name for p in (tmp_path / "lat").iterdir()) == ["anim.gif.frame0000.safetensors", "anim.gif.frame0001.safetensors"]
    for i in range(2):
        assert read_latent(tmp_path / "lat" / f"anim.gif.frame000{i}.safetensors").meta.frame == (i, 3)


def test_resume_keeps_each_runs_own_files(tmp_path, model_path):
    _save(tmp_path / "in" / "anim.gif", _frames())
    lat = tmp_path / "lat"
    r = _encode(model_path, str(tmp_path / "in"), "-o", str(lat), "-q")  # without: the first frame, anim.gif.safetensors
    assert r.exit_code == 0, r.output
    single = (lat / "anim.gif.safetensors").read_bytes()
    r = _encode(model_path, str(tmp_path / "in"), "-o", str(lat), "--all-frames", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["done"] == 3
    assert (lat / "anim.gif.safetensors").read_bytes() == single  # another output name: left alone
    r = _encode(model_path, str(tmp_path / "in"), "-o", str(lat), "--all-frames", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["skipped"] == 3
    # a frame's name holding a latent made without --all-frames (same input, model, options) is not kept
    (lat / "anim.gif.frame0000.safetensors").write_bytes(single)
    r = _encode(model_path, str(tmp_path / "in"), "-o", str(lat), "--all-frames", "--json")
    assert r.exit_code == 1
    (failure,) = json.loads(r.stdout)["failures"]
    assert "all_frames unset (now true)" in failure["reason"] and "--overwrite" in failure["reason"]


def test_frames_of_tar_members_and_the_manifest(tmp_path, model_path):
    gif = io.BytesIO()
    _frames()[0].save(gif, format="GIF", save_all=True, append_images=_frames()[1:], duration=100)
    tar_path = tmp_path / "shard.tar"
    with tarfile.open(tar_path, "w") as tar:
        info = tarfile.TarInfo("k/anim.gif")
        info.size = len(gif.getvalue())
        tar.addfile(info, io.BytesIO(gif.getvalue()))
    lat = tmp_path / "lat"
    r = _encode(model_path, str(tar_path), "-o", str(lat), "--all-frames", "--manifest", "-q")
    assert r.exit_code == 0, r.output
    outs = sorted(p.name for p in (lat / "shard.tar" / "k").iterdir())
    assert outs == [f"anim.gif.frame{i:04d}.safetensors" for i in range(3)]
    lines = [json.loads(line) for line in (lat / "manifest.jsonl").read_text().splitlines()]
    assert sorted(line["output"] for line in lines) == [f"shard.tar/k/{o}" for o in outs]
    (lat / "shard.tar" / "k" / outs[1]).unlink()
    r = _encode(model_path, "-o", str(lat), "--all-frames", "--from-manifest", str(lat / "manifest.jsonl"), "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert (summary["done"], summary["skipped"]) == (1, 2)
    assert read_latent(lat / "shard.tar" / "k" / outs[1]).meta.frame == (1, 3)


def test_shards_keep_a_files_frames_together(tmp_path, model_path):
    for name in ("a.gif", "b.gif", "c.gif"):
        _save(tmp_path / "in" / name, _frames())
    seen = {}
    for i in range(2):
        r = _encode(model_path, str(tmp_path / "in"), "-o", str(tmp_path / "lat"), "--all-frames", "--shard", f"{i}/2", "--json")
        assert r.exit_code == 0, r.output
        before = set(seen)
        for p in (tmp_path / "lat").glob("*.safetensors"):
            seen.setdefault(p.name, i)
        assert set(seen) - before  # each shard did some
    assert len(seen) == 9
    for name in ("a.gif", "b.gif", "c.gif"):
        assert len({seen[f"{name}.frame{f:04d}.safetensors"] for f in range(3)}) == 1


def test_clashes_layouts_and_usage(tmp_path, model_path):
    _save(tmp_path / "x" / "anim.gif", _frames())
    _save(tmp_path / "y" / "anim.gif", _frames())
    r = _encode(model_path, str(tmp_path / "x"), str(tmp_path / "y"), "-o", str(tmp_path / "lat"), "--all-frames")
    assert r.exit_code == 1 and "is also the output of" in r.stderr
    assert len(list((tmp_path / "lat").iterdir())) == 3  # the first one's frames
    # a file named like a frame's output, named directly, never takes a frame's name
    (tmp_path / "x" / "anim.gif.frame0000").write_bytes((tmp_path / "x" / "anim.gif").read_bytes())
    r = _encode(model_path, str(tmp_path / "x" / "anim.gif.frame0000"), "-o", str(tmp_path / "lat"), "--all-frames")
    assert r.exit_code == 1 and "would take the name of a frame of anim.gif" in r.stderr
    r = _encode(model_path, str(tmp_path / "x"), "-o", str(tmp_path / "k"), "--all-frames", "--layout", "kohya")
    assert r.exit_code == 2 and "--all-frames does not go with --layout kohya" in r.stderr
    r = _encode(model_path, str(tmp_path / "x"), "-o", str(tmp_path / "c"), "--all-frames", "--layout", "comfyui", "-q")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [f"anim.gif.frame{i:04d}.latent" for i in range(3)]


def test_overwrite_removes_the_frames_an_earlier_version_had(tmp_path, model_path):
    source = _save(tmp_path / "in" / "anim.gif", _frames(3))
    lat = tmp_path / "lat"
    assert _encode(model_path, str(tmp_path / "in"), "-o", str(lat), "--all-frames", "-q").exit_code == 0
    (lat / "notes.anim.gif.frame0003.safetensors").write_text("someone's")  # not a frame's name: untouched
    _save(source, _frames(2))  # the image now has 2 frames
    r = _encode(model_path, str(tmp_path / "in"), "-o", str(lat), "--all-frames", "--json")
    assert r.exit_code == 1 and json.loads(r.stdout)["failed"] == 2  # made from another version: not kept, not replaced
    assert (lat / "anim.gif.frame0002.safetensors").exists()
    r = _encode(model_path, str(tmp_path / "in"), "-o", str(lat), "--all-frames", "--overwrite", "-q")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in lat.iterdir()) == ["anim.gif.frame0000.safetensors", "anim.gif.frame0001.safetensors", "notes.anim.gif.frame0003.safetensors"]
    _frames()[0].save(source)  # now a still image: its frames' files go, someone's file of a frame's name stays
    (lat / "anim.gif.frame0001.safetensors").write_text("someone's")
    r = _encode(model_path, str(tmp_path / "in"), "-o", str(lat), "--all-frames", "--overwrite", "-q")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in lat.iterdir()) == ["anim.gif.frame0001.safetensors", "anim.gif.safetensors", "notes.anim.gif.frame0003.safetensors"]


def test_max_pixels_applies_to_frames_and_each_frame_gets_its_own_draw(tmp_path, model_path):
    _save(tmp_path / "in" / "anim.gif", _frames())
    r = _encode(model_path, str(tmp_path / "in"), "-o", str(tmp_path / "big"), "--all-frames", "--max-pixels", "500")
    assert r.exit_code == 1 and "anim.gif: image is 26x20 = 520 pixels, over the limit of 500" in r.stderr
    assert not (tmp_path / "big").exists() or not list((tmp_path / "big").iterdir())
    r = _encode(model_path, str(tmp_path / "in"), "-o", str(tmp_path / "lat"), "--all-frames", "--sample", "--seed", "3", "-q")
    assert r.exit_code == 0, r.output
    seeds = {read_latent(p).meta.seed for p in (tmp_path / "lat").iterdir()}
    assert len(seeds) == 3 and None not in seeds
