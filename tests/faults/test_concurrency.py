"""Two ``vqcli encode`` runs over the same folder into the same output at once: every output is
written exactly once and complete, the run that comes second to a file reports it skipped, and
neither removes the other's file in the making."""

from __future__ import annotations

import json
import random
import time

import pytest

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
