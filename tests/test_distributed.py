"""Many processes: ``torchrun --standalone --nproc_per_node=2 -m vqcli ...`` on the CPU gives what
one process gives, with the summary of all on rank 0; the batch-exact split in-process.

Oracle: the same command in one process with as many threads as each rank has (on the CPU some
convolutions round differently with another number of threads, see ``vqcli.distributed``), and,
for the failure, the broken file named by the test. torchrun starts slowly: three invocations in
all (encode, decode, roundtrip), marked slow.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from _scaleout import (
    KL,
    TREE,
    cli,
    latents,
    make_tree,
    manifest_lines,
    photo,
    same_tensors,
    save_model,
)
from PIL import Image

from vqcli.checkpoints.load import ModelRef
from vqcli.errors import UsageError
from vqcli.model.autoencoder import AutoEncoder
from vqcli.pipeline import distributed, shards
from vqcli.pipeline.encode import EncodeOptions, encode_files
from vqcli.pipeline.jobs import image_jobs
from vqcli.pipeline.selection import Selection, block_size, select_jobs

RANK_THREADS = max(1, distributed.cpu_count() // 2)  # what each of two ranks on this machine gets


@contextlib.contextmanager
def threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def torchrun(*args, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONWARNINGS"] = "ignore"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vqcli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


# --- the process's place ----------------------------------------------------------------------------


def test_context_from_torchrun_variables():
    assert distributed.context_from_env({}) == distributed.Context(0, 1, 0, 1)
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    ctx = distributed.context_from_env(env)
    assert (ctx.rank, ctx.world, ctx.local_rank, ctx.local_world, ctx.active, ctx.main) == (5, 8, 1, 4, True, False)
    assert distributed.context_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}).local_world == 2


@pytest.mark.parametrize(
    "env", [{"WORLD_SIZE": "two"}, {"RANK": "2", "WORLD_SIZE": "2"}, {"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"}]
)
def test_context_refuses_variables_that_do_not_fit(env):
    with pytest.raises(UsageError):
        distributed.context_from_env(env)


def test_threads_are_split_among_the_processes_of_a_node():
    ctx = distributed.Context(1, 2, 1, 2)
    with threads(torch.get_num_threads()):
        assert distributed.split_threads(ctx, {"OMP_NUM_THREADS": "1"}) == max(1, distributed.cpu_count() // 2)
        assert torch.get_num_threads() == max(1, distributed.cpu_count() // 2)
        assert distributed.split_threads(ctx, {"OMP_NUM_THREADS": "3"}) is None  # the user's choice stays
        assert distributed.split_threads(distributed.Context(), {}) is None


def test_one_process_needs_no_group():
    ctx = distributed.Context()
    distributed.start(ctx)
    assert distributed.all_gather(ctx, {"a": 1}) == [{"a": 1}]
    assert distributed.from_main(ctx, 7) == 7
    distributed.check_same(ctx, "x", "never")
    assert distributed.place(ctx, torch.device("cpu")) == torch.device("cpu")


# --- batches: the same images together, however the inputs are split ------------------------------------


def test_batched_shares_give_the_bits_of_the_whole(tmp_path):
    """70 images of three sizes, batches of 2 (blocks of 32 files): blocks keep each batch's
    company, so the shares' latents are bit-identical to the whole run's."""
    root = tmp_path / "in"
    rng = np.random.default_rng(0)
    for i in range(70):
        h, w = [(8, 8), (12, 8), (8, 16)][int(rng.integers(3))]
        p = root / f"d{i % 3}" / f"{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo(h, w, i)).save(p)
    torch.manual_seed(0)
    model = AutoEncoder(KL).eval()
    ref = ModelRef("tiny", embedded=False, path=tmp_path / "tiny.safetensors")
    options = EncodeOptions(batch_size=2)
    with threads(1):
        results = list(encode_files([root], tmp_path / "whole", model, ref, options=options))
        assert len(results) == 70 and {r.status for r in results} == {"done"}
        for i in range(3):
            sel = Selection(share=shards.Share(i, 3))
            assert {r.status for r in encode_files([root], tmp_path / "pieces", model, ref, options=options, selection=sel)} == {"done"}
    assert len(set(j.block for j in select_jobs(lambda: image_jobs([root], tmp_path / "x"), Selection(), block_size(2)))) == 3
    assert same_tensors(latents(tmp_path / "pieces"), latents(tmp_path / "whole"))


# --- torchrun ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The TREE images, one broken file that falls to rank 1, a model, and one process's outputs."""
    d = tmp_path_factory.mktemp("dist")
    root = make_tree(d / "in")
    broken = root / "g" / "zz-broken.png"
    for n in range(1, 400):  # a size that puts it in rank 1's share
        broken.write_bytes(b"\x89PNG broken" + b"x" * (37 * n))
        if any(j.input == broken for j in select_jobs(lambda: image_jobs([root], d / "o"), Selection(share=shards.Share(1, 2)), 1)):
            break
    model = save_model(d / "kl.safetensors")
    with threads(RANK_THREADS):
        assert cli("encode", root, "-o", d / "one", "--model", model).exit_code == 1
        assert cli("decode", d / "one", "-o", d / "one-dec", "--model", model).exit_code == 0
        r = cli("roundtrip", root, "-o", d / "one-rt", "--model", model, "--json")
    return {"dir": d, "root": root, "broken": broken, "model": model, "roundtrip": json.loads(r.stdout)}


@pytest.mark.slow
def test_torchrun_encode_equals_one_process_and_reports_every_rank(work):
    d, root = work["dir"], work["root"]
    out = d / "two"
    p = torchrun("encode", root, "-o", out, "--model", work["model"], "--json")
    assert p.returncode == 1, p.stderr[-3000:]
    assert "SIGTERM" not in p.stderr  # rank 0 ends last: torchrun stops no rank mid-way
    s = json.loads(p.stdout)  # rank 0 alone prints
    assert (s["done"], s["failed"], s["total"], s["processes"]) == (len(TREE), 1, len(TREE) + 1, 2)
    assert [f["path"] for f in s["failures"]] == [str(work["broken"])]
    assert [r["rank"] for r in s["ranks"]] == [0, 1]
    assert s["ranks"][1]["failed"] == 1 and s["ranks"][0]["failed"] == 0
    assert all(r["done"] > 0 for r in s["ranks"])
    assert same_tensors(latents(out), latents(d / "one"))
    # the manifest: every input once, merged from both ranks
    lines = manifest_lines(out / "manifest.jsonl")
    assert sorted(l["rel"] for l in lines) == sorted([*TREE, "g/zz-broken.png"])
    assert {l["rel"]: l["status"] for l in lines}["g/zz-broken.png"] == "failed"
    assert all((out / l["output"]).is_file() for l in lines if l["status"] == "done")
    assert not list(out.glob("manifest-part-*"))


@pytest.mark.slow
def test_torchrun_decode_writes_the_same_images(work):
    d = work["dir"]
    p = torchrun("decode", d / "one", "-o", d / "two-dec", "--model", work["model"], "--json", "--no-manifest")
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads(p.stdout)
    assert s["done"] == len(TREE) and sum(r["done"] for r in s["ranks"]) == len(TREE)
    one = {q.relative_to(d / "one-dec").as_posix(): q.read_bytes() for q in (d / "one-dec").rglob("*.png")}
    two = {q.relative_to(d / "two-dec").as_posix(): q.read_bytes() for q in (d / "two-dec").rglob("*.png")}
    assert len(one) == len(TREE) and one == two
    assert not (d / "two-dec" / "manifest.jsonl").exists()


@pytest.mark.slow
def test_torchrun_roundtrip_gathers_every_image_on_rank_0(work):
    d = work["dir"]
    p = torchrun("roundtrip", work["root"], "-o", d / "two-rt", "--model", work["model"], "--json")
    assert p.returncode == 1, p.stderr[-3000:]
    s, one = json.loads(p.stdout), work["roundtrip"]
    def rows(summary, out):  # (each run names its own pictures: compare them relative to its folder)
        return sorted(({**i, "picture": Path(i["picture"]).relative_to(out).as_posix()} if i.get("picture") else i
                       for i in summary["images"]), key=lambda i: i["path"])

    assert rows(s, d / "two-rt") == rows(one, d / "one-rt")
    assert s["mean"] == one["mean"] and len(s["images"]) == len(TREE)
    pictures = lambda folder: {q.relative_to(folder).as_posix(): np.asarray(Image.open(q)) for q in folder.rglob("*.png")}  # noqa: E731
    a, b = pictures(d / "one-rt"), pictures(d / "two-rt")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
