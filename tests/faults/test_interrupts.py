"""kill -9 and Ctrl-C during the installed ``vqcli encode``, ``decode``, ``train`` and ``convert``.

After each kill every file under its final name is complete (read back and compared with the
model called directly), files finished earlier are untouched (inode, mtime, bytes), and a re-run
does only what is missing and leaves no temporary file anywhere. Each command is killed several
times in a row, the first time in the middle of a write (the hook of ``conftest``), the others at
random moments; the seeds are fixed so that a failure can be replayed.
"""

from __future__ import annotations

import json
import random
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqcli import AutoEncoder
from vqcli.checkpoints.load import model_ref
from vqcli.checkpoints.native import load_native
from vqcli.checkpoints.read import load_checkpoint
from vqcli.io.images import written_by_vqcli
from vqcli.io.latents import read_latent
from vqcli.pipeline.encode import EncodeOptions, encode_files
from vqcli.pipeline.overlap import WRITE_DEPTH

from .conftest import (
    KL,
    TRAIN_TINY,
    assert_untouched,
    check_latents,
    finals,
    hook_env,
    image_folder,
    interrupt,
    kill,
    load_model,
    run,
    save_model,
    snapshot,
    start,
    temporaries,
    wait_for,
)

KILLS = 3  # per command: one in the middle of a write, the others at random points (see _kill_runs)
# Ctrl-C ends the process in about a second on an idle machine (the step or batch under way
# finishes, then the summary). No test asserts a time (a busy machine makes any bound flaky): each
# shows instead that the process stopped before the work it was given was done, and waits at most
# HANG_S (a hang, not a slow stop) for it to end.
HANG_S = 120


def _check_images(out: Path, latents: Path, model: AutoEncoder) -> int:
    """Every image in ``out`` is complete, vqcli's, and the model's decoding of its latent; how many."""
    files = finals(out, "*.png")
    for f in files:
        with Image.open(f) as im:
            im.load()  # a truncated PNG fails here
            pixels = np.asarray(im.convert("RGB")).astype(int)
        assert written_by_vqcli(f)
        z = read_latent(latents / (f.relative_to(out).as_posix() + ".safetensors")).tensor.float()
        with torch.no_grad():
            y = model.decode(z[None])[0].clamp(-1, 1)
        expected = np.rint(((y + 1) / 2).permute(1, 2, 0).numpy() * 255).astype(int)
        assert np.abs(pixels - expected).max() <= 1, f
    return len(files)


def _kill_runs(args: list, out: Path, *, hook_dir: Path, tmp_path: Path, seed: int, count, check, total: int) -> None:
    """Start ``vqcli *args`` ``KILLS`` times, killing it each time: first paused inside its third
    write, then at a random point of its work: inside the data's write (fsync) or just before the
    rename into place (replace) of a random one of its next outputs. The points are chosen by the
    hook, not by a delay, so that a busy machine cannot let the run finish first. After each kill:
    every output complete (``check``), nothing finished before changed."""
    r = random.Random(seed)
    for i in range(KILLS):
        before = snapshot(out) if out.exists() else {}
        at = "fsync:3" if i == 0 else f"{r.choice(['fsync', 'replace'])}:{r.randint(1, 5)}"
        mark = tmp_path / f"mark{i}"
        proc = start(*args, env=hook_env(hook_dir, mark, at))
        assert wait_for(mark.exists, proc), proc.communicate()
        kill(proc)
        assert check() == count()
        assert_untouched(before, snapshot(out))
        if i == 0:  # what the next run must clean up: the write the kill cut short
            assert temporaries(out), "the kill inside a write should have left its temporary file"
        assert count() < total, "the run should have been killed part-way"


@pytest.mark.slow
def test_encode_killed_repeatedly_resumes_and_leaves_nothing_behind(tmp_path, models, hook_dir):
    src = image_folder(tmp_path / "in", 40, sub_every=10)
    out = tmp_path / "lat"
    model = load_model(models["kl"])
    inputs_before = snapshot(src)
    args = ["encode", src, "-o", out, "--model", models["kl"], "--quiet"]
    count = lambda: len(finals(out, "*.png.safetensors"))  # noqa: E731
    _kill_runs(args, out, hook_dir=hook_dir, tmp_path=tmp_path, seed=1, count=count,
               check=lambda: check_latents(out, src, model), total=40)
    before = snapshot(out)
    p = run("encode", src, "-o", out, "--model", models["kl"], "--json")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert (s["skipped"], s["done"], s["failed"]) == (len(before), 40 - len(before), 0)
    assert temporaries(out) == []
    assert_untouched(before, snapshot(out))
    assert check_latents(out, src, model) == 40
    assert_untouched(inputs_before, snapshot(src))


def _latents(tmp_path: Path, models, n: int) -> tuple[Path, Path]:
    """Images and their latent files, written in-process (the decode tests' inputs)."""
    src = image_folder(tmp_path / "in", n, sub_every=10)
    lat = tmp_path / "lat"
    ae = load_model(models["kl"])
    results = list(encode_files([src], lat, ae, model_ref(str(models["kl"])), options=EncodeOptions()))
    assert all(r.status == "done" for r in results) and len(results) == n
    return src, lat


@pytest.mark.slow
def test_decode_killed_repeatedly_resumes_and_leaves_nothing_behind(tmp_path, models, hook_dir):
    _, lat = _latents(tmp_path, models, 40)
    out = tmp_path / "rec"
    model = load_model(models["kl"])
    args = ["decode", lat, "-o", out, "--model", models["kl"], "--quiet"]
    count = lambda: len(finals(out, "*.png"))  # noqa: E731
    _kill_runs(args, out, hook_dir=hook_dir, tmp_path=tmp_path, seed=2, count=count,
               check=lambda: _check_images(out, lat, model), total=40)
    before = snapshot(out)
    p = run("decode", lat, "-o", out, "--model", models["kl"], "--json")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert (s["skipped"], s["done"], s["failed"]) == (len(before), 40 - len(before), 0)
    assert temporaries(out) == []
    assert_untouched(before, snapshot(out))
    assert _check_images(out, lat, model) == 40


def _ckpt_step(path: Path) -> int:
    state = torch.load(path, map_location="cpu", weights_only=True)  # loadable the safe way, or this fails
    return int(state["step"])


@pytest.mark.slow
def test_train_killed_and_interrupted_resumes_to_the_same_model(tmp_path, hook_dir):
    """Killed inside a checkpoint write, killed at a random moment, then Ctrl-C, each time resumed
    from the checkpoint: the final model is exactly the one an uninterrupted run makes."""
    data = image_folder(tmp_path / "data", 3, size=48)
    out = tmp_path / "m" / "model.safetensors"
    ckpt = out.with_name(out.name + ".ckpt")
    steps = 30
    base = ["train", data, "-o", out, "--steps", steps, "--checkpoint-every", 1, "--val-every", 1000, *TRAIN_TINY]
    r = random.Random(3)
    for i in range(3):
        resume = ckpt.exists()
        first = _ckpt_step(ckpt) if resume else 0
        args = [*base, "--resume"] if resume else base
        if i == 0:
            mark = tmp_path / "mark"
            proc = start(*args, env=hook_env(hook_dir, mark, "fsync:3"))  # inside the third checkpoint write
            assert wait_for(mark.exists, proc), proc.communicate()
        else:
            # inside a random one of its next checkpoint writes, after at least one new checkpoint
            # (paused there by the hook: a delay instead let a run on a busy machine reach the end)
            mark = tmp_path / f"mark{i}"
            proc = start(*args, env=hook_env(hook_dir, mark, f"fsync:{r.randint(2, 6)}"))
            assert wait_for(mark.exists, proc), proc.communicate()
        if i < 2:
            kill(proc)
        else:
            _, stderr, _ = interrupt(proc, timeout=HANG_S)
            assert proc.returncode == 130, stderr
            last = stderr.strip().splitlines()[-1]
            assert "Traceback" not in stderr and f"the checkpoint {ckpt} holds step {_ckpt_step(ckpt)}" in last, last
            assert last.endswith("continue with --resume")
        assert not out.exists(), "the run should have been stopped before the end"
        step = _ckpt_step(ckpt)  # loadable with weights_only, or this fails
        assert first < step < steps
        if i == 0:
            assert step == 2 and temporaries(out.parent)
    step = _ckpt_step(ckpt)
    p = run(*base, "--resume")
    assert p.returncode == 0, p.stderr
    logged = [int(m) for m in re.findall(r"^step (\d+)/", p.stderr, re.M)]
    assert logged[0] == step + 1 and logged[-1] == steps  # only what was missing
    assert temporaries(out.parent) == []
    resumed = load_native(out)
    p = run(*[a if a != out else tmp_path / "ref.safetensors" for a in base])
    assert p.returncode == 0, p.stderr
    reference = load_native(tmp_path / "ref.safetensors")
    assert resumed.identity() == reference.identity()


@pytest.mark.slow
def test_convert_killed_inside_its_writes(tmp_path, models, hook_dir):
    """A vqcli file, a new diffusers folder, and the replacement of an existing diffusers folder,
    each killed in the middle: nothing half-written is ever visible, the re-run completes it, and a
    replacement cut short gives the previous model back."""
    src, other = models["kl"], save_model(tmp_path / "other.safetensors", KL, 5)
    identity = lambda p: load_checkpoint(p).identity()  # noqa: E731

    # a single file, killed after writing its temporary file, before the rename
    target = tmp_path / "out" / "half.safetensors"
    proc = start("convert", src, "-o", target, "--dtype", "float16", env=hook_env(hook_dir, tmp_path / "m1", "fsync:1"))
    assert wait_for((tmp_path / "m1").exists, proc), proc.communicate()
    kill(proc)
    assert not target.exists() and temporaries(target.parent)
    p = run("convert", src, "-o", target, "--dtype", "float16")
    assert p.returncode == 0, p.stderr
    assert temporaries(target.parent) == []
    converted = load_checkpoint(target).state_dict()
    for k, v in load_model(src).state_dict().items():
        assert torch.equal(converted[k], v.half().float()), k

    # a diffusers folder, killed between its two files
    folder = tmp_path / "out" / "diffusers"
    proc = start("convert", src, "-o", folder, "--to", "diffusers", env=hook_env(hook_dir, tmp_path / "m2", "fsync:1"))
    assert wait_for((tmp_path / "m2").exists, proc), proc.communicate()
    kill(proc)
    assert not folder.exists() and temporaries(folder.parent)
    p = run("convert", src, "-o", folder, "--to", "diffusers")
    assert p.returncode == 0, p.stderr
    assert temporaries(folder.parent) == [] and identity(folder) == identity(src)

    # replacing it, killed after the old folder was moved aside and before the new one took its place
    env = hook_env(hook_dir, tmp_path / "m3", "replace:2")
    proc = start("convert", other, "-o", folder, "--to", "diffusers", "--overwrite", env=env)
    assert wait_for((tmp_path / "m3").exists, proc), proc.communicate()
    kill(proc)
    assert not folder.exists()
    p = run("convert", other, "-o", folder, "--to", "diffusers")  # no --overwrite: the old model comes back
    assert p.returncode == 1 and "already exists" in p.stderr and "Traceback" not in p.stderr
    assert identity(folder) == identity(src) and temporaries(folder.parent) == []
    p = run("convert", other, "-o", folder, "--to", "diffusers", "--overwrite")
    assert p.returncode == 0, p.stderr
    assert identity(folder) == identity(other) and temporaries(folder.parent) == []


# --- Ctrl-C ---------------------------------------------------------------------------------------


def _signal_inside_a_write(tmp_path: Path, models, hook_dir: Path, sig: int, *options: str):
    """Decode 12 latents, send ``sig`` while the third image is being written (the write paused by
    the hook, let go at the signal, as a real write would go on): the latents' folder, the output
    folder, the exit code, stdout and stderr. (That it stopped early, the callers check: fewer
    images than latents.)"""
    _, lat = _latents(tmp_path, models, 12)
    out = tmp_path / "rec"
    mark, release = tmp_path / "mark", tmp_path / "release"
    env = hook_env(hook_dir, mark, "fsync:3", release)
    proc = start("decode", lat, "-o", out, "--model", models["kl"], *options, "--json", env=env)
    assert wait_for(mark.exists, proc), proc.communicate()
    proc.send_signal(sig)
    release.touch()
    stdout, stderr = proc.communicate(timeout=HANG_S)
    return lat, out, proc.returncode, stdout, stderr


@pytest.mark.slow
def test_ctrl_c_inside_a_write_stops_at_once_and_resumes(tmp_path, models, hook_dir):
    """Ctrl-C while a decoded image is being written: exit 130 at once (most images not done), the summary
    says what was done, no temporary file is left, and the re-run does the rest.

    The write under way is either abandoned (written by the main thread, which Ctrl-C interrupts) or
    finished (written by a thread behind the model, which the run waits for): the hook lets it go
    on at the signal, as a real write would, and both outcomes are whole."""
    lat, out, code, stdout, stderr = _signal_inside_a_write(tmp_path, models, hook_dir, signal.SIGINT)
    assert code == 130, stderr
    s = json.loads(stdout)
    # Two files were written before the paused one; the write-behind thread may also hold up to
    # WRITE_DEPTH more, submitted while the third was paused, and finishes them all at the signal.
    assert s["interrupted"] is True and s["failed"] == 0 and 2 <= s["done"] <= 3 + WRITE_DEPTH
    assert temporaries(out) == []
    before = snapshot(out)
    assert len(before) == s["done"] and _check_images(out, lat, load_model(models["kl"])) == s["done"]
    p = run("decode", lat, "-o", out, "--model", models["kl"], "--json")
    assert p.returncode == 0, p.stderr
    assert (json.loads(p.stdout)["skipped"], json.loads(p.stdout)["done"]) == (s["done"], 12 - s["done"])
    assert_untouched(before, snapshot(out))


@pytest.mark.slow
def test_sigterm_stops_like_ctrl_c_and_the_manifest_keeps_what_was_done(tmp_path, models, hook_dir):
    """SIGTERM (a scheduler pre-empting the job) inside a write: the writes under way finish, the
    summary and the manifest list exactly the files on disk, the exit code is 143, and the same
    command again does the rest."""
    lat, out, code, stdout, stderr = _signal_inside_a_write(tmp_path, models, hook_dir, signal.SIGTERM, "--manifest")
    assert code == 143 and "Traceback" not in stderr, stderr
    s = json.loads(stdout)
    assert s["interrupted"] is True and s["failed"] == 0 and 2 <= s["done"] <= 3 + WRITE_DEPTH
    assert temporaries(out) == []
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    done = sorted(line["output"] for line in lines if line.get("status") == "done")
    assert done == sorted(p.relative_to(out).as_posix() for p in finals(out, "*.png")), (lines, s)
    assert len(done) == s["done"]
    p = run("decode", lat, "-o", out, "--model", models["kl"], "--manifest", "--json")
    assert p.returncode == 0, p.stderr
    assert (json.loads(p.stdout)["skipped"], json.loads(p.stdout)["done"]) == (s["done"], 12 - s["done"])
    assert _check_images(out, lat, load_model(models["kl"])) == 12


@pytest.mark.slow
def test_ctrl_c_inside_convert_writes_nothing(tmp_path, models, hook_dir):
    folder = tmp_path / "out" / "diffusers"
    mark = tmp_path / "mark"
    proc = start("convert", models["kl"], "-o", folder, "--to", "diffusers", env=hook_env(hook_dir, mark, "fsync:1"))
    assert wait_for(mark.exists, proc), proc.communicate()
    _, stderr, _ = interrupt(proc, timeout=HANG_S)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not folder.exists() and temporaries(folder.parent) == []
