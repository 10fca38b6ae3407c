"""Two ``vqcli encode`` runs over the same folder into the same output at once: every output is
written exactly once and complete, the run that comes second to a file reports it skipped, and
neither removes the other's file in the making."""

from __future__ import annotations

import json
import os
import random
import subprocess
import time

import pytest

from vqcli.io.atomic import TMP_PREFIX

from .conftest import (
    check_latents,
    hook_env,
    image_folder,
    load_model,
    run,
    start,
    temporaries,
    wait_for,
)

N = 24


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_two_runs_at_once_write_each_output_once(tmp_path, models, seed):
    src = image_folder(tmp_path / "in", N, sub_every=8)
    out = tmp_path / "lat"
    r = random.Random(seed)
    batch = ["--batch-size", "4"] if seed == 2 else []  # batches finish several files at once
    a = start("encode", src, "-o", out, "--model", models["kl"], "--json", *batch)
    time.sleep(r.uniform(0, 0.5))  # the second starts a little later: it catches up on skipped files
    b = start("encode", src, "-o", out, "--model", models["kl"], "--json")
    results = []
    for proc in (a, b):
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0 and stderr == "", stderr
        results.append(json.loads(stdout))
    assert all(s["failed"] == 0 and s["total"] == N for s in results)
    # each output written by exactly one of them; the other skipped it
    assert sum(s["done"] for s in results) == N and sum(s["skipped"] for s in results) == N
    assert temporaries(out) == []
    assert check_latents(out, src, load_model(models["kl"])) == N


@pytest.mark.slow
def test_a_live_runs_temporary_file_is_never_removed(tmp_path, models, hook_dir):
    """Run A stops inside its first write (its temporary file there, complete); run B does the whole
    folder meanwhile, sweeping the output folder: A's file must survive B. Released, A finds B's
    output in place and reports that file skipped."""
    src = image_folder(tmp_path / "in", 4)
    out = tmp_path / "lat"
    mark, release = tmp_path / "mark", tmp_path / "release"
    a = start("encode", src, "-o", out, "--model", models["kl"], "--json", env=hook_env(hook_dir, mark, "fsync:1", release))
    assert wait_for(mark.exists, a), a.communicate()
    pending = temporaries(out)
    assert len(pending) == 1
    p = run("encode", src, "-o", out, "--model", models["kl"], "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["done"] == 4, p.stderr
    assert temporaries(out) == pending  # B left A's file alone
    release.touch()
    stdout, stderr = a.communicate(timeout=300)
    assert a.returncode == 0 and stderr == "", stderr
    s = json.loads(stdout)
    assert (s["done"], s["skipped"], s["failed"]) == (0, 4, 0)  # its first file: "written meanwhile"
    assert temporaries(out) == []
    assert check_latents(out, src, load_model(models["kl"])) == 4


def test_sweep_removes_only_what_writers_that_are_gone_left(tmp_path):
    """Which temporary files a run removes, case by case (in-process, so the live writer is this
    process itself and the dead one a child that has exited)."""
    from vqcli.io import atomic as fileio

    gone = subprocess.Popen(["true"])
    gone.wait()
    host = fileio._HOST
    names = {
        "dead": f"{TMP_PREFIX}{gone.pid}-{host}-0123abcd.png",  # its process has ended: removed
        "parent": f"{TMP_PREFIX}{os.getppid()}-{host}-0123abce.png",  # a live process's: kept
        "other host": f"{TMP_PREFIX}{gone.pid}-elsewhere-0123abcf.png",  # cannot be told: kept...
        "other host, old": f"{TMP_PREFIX}{gone.pid}-elsewhere-01234567.png",  # ...until a day old
        "old style": f"{TMP_PREFIX}k2j4h5.png",  # earlier versions' names: by age too (young: kept)
        "ours, not live": f"{TMP_PREFIX}{os.getpid()}-{host}-89abcdef.png",  # an earlier process numbered like us
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"half")
    (tmp_path / "kept.png").write_bytes(b"not temporary")
    os.utime(tmp_path / names["other host, old"], (0, 0))
    with fileio.atomic_path(tmp_path / "new.bin", overwrite=False) as tmp:  # sweeps the folder first
        tmp.write_bytes(b"whole")
        assert fileio.sweep_stale(f"{tmp_path}/.") == 0 and tmp.exists()  # our live file, by another spelling
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([names["parent"], names["other host"], names["old style"], "kept.png", "new.bin"])
