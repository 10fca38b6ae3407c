"""A run over many images keeps the heap paged in between them (accel.fast_allocator, held).

Each test runs in a fresh Python process: the allocator's state is process-wide, and page faults
are counted for the computing thread only (RUSAGE_THREAD), so that the reader and writer threads
do not blur them.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Runs a CLI-like encode and decode over four equal images and counts, per model call, the page
# faults of the thread that computes; the same two calls through the library, one image at a time.
_FAULTS_PER_IMAGE = r"""
import json, resource, sys
from pathlib import Path
import numpy as np
import torch
from PIL import Image
import vqcli.pipeline as pipeline
from vqcli.accel import _LIBC
from vqcli.images import load_image
from vqcli.models import model_ref, resolve_model

root, tmp = Path(sys.argv[1]), Path(sys.argv[2])
torch.set_num_threads(1)
rgb = load_image(root / "sample_images" / "astronaut.png")[:256, :256]
(tmp / "in").mkdir()
for i in range(4):
    Image.fromarray((rgb * 255).round().astype(np.uint8)).save(tmp / "in" / f"{i}.png")

faults, budgets = [], []
plain_run = pipeline._run
def counted_run(model, fn, x, device, dtype, budget=None, compile=False):
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    out = plain_run(model, fn, x, device, dtype, budget, compile)
    faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
    budgets.append(budget)
    return out
pipeline._run = counted_run

model = resolve_model("default", device=torch.device("cpu"))
done = [r.status for r in pipeline.encode_files([tmp / "in"], tmp / "lat", model, model_ref("default"))]
encode = faults[:]
faults.clear()
chooser = pipeline.ModelChooser(model, "--model default", device=torch.device("cpu"), dtype=torch.float32)
done += [r.status for r in pipeline.decode_files([tmp / "lat"], tmp / "out", chooser)]
decode = faults[:]
faults.clear()
for _ in range(4):
    pipeline.decode_array(model, pipeline.encode_array(model, rgb), 256, 256)
print(json.dumps({"glibc": _LIBC is not None, "done": done, "encode": encode, "decode": decode, "alone": faults,
                  "budgets": budgets[:8]}))  # (the runs' calls; the library's got none)
"""


def test_a_run_pages_the_heap_in_once(tmp_path):
    """Past the first image, a run's model calls take (almost) no page faults; the library called
    for one image at a time gives the heap back after each call and faults it in again (which is
    what every image of a run paid before the run kept its heap). A run's memory budget is taken
    once, at its start: the heap it keeps would otherwise shrink the free memory it is taken from."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS_PER_IMAGE, str(root), str(tmp_path)], capture_output=True, text=True, check=True
    )
    r = json.loads(out.stdout)
    if not r["glibc"]:
        pytest.skip("not glibc: the allocator settings do not apply")
    assert r["done"] == ["done"] * 8
    encode_budgets, decode_budgets = r["budgets"][:4], r["budgets"][4:]
    for budgets in (encode_budgets, decode_budgets):
        assert budgets[0] is not None and budgets == [budgets[0]] * 4, r["budgets"]
    alone_encode, alone_decode = r["alone"][0::2], r["alone"][1::2]  # encode_array, decode_array, ...
    for calls in (r["encode"], r["decode"], alone_encode, alone_decode):
        assert len(calls) == 4
        assert calls[0] > 2000, calls  # the first image pages in tens of MB of maps
    # The later images together fault less than the first alone. (Not none: now and then the heap
    # still grows by a few MB; measured [28833, 3172, 4096, 0, 0, 0] and [35547, 4865, 0, 4240, 1, 0]
    # over six images.)
    for calls in (r["encode"], r["decode"]):
        assert sum(calls[1:]) < calls[0], calls
    for calls in (alone_encode, alone_decode):
        assert min(calls[1:]) > calls[0] / 2, calls


_RELEASE = r"""
import json
import torch
from vqcli.accel import _LIBC, fast_allocator, heap_free, release_heap_above

def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))

base = rss()
with fast_allocator():
    t = torch.empty(2**30, dtype=torch.uint8).fill_(1)
    del t
    kept, free = rss() - base, heap_free()
    release_heap_above(2 * 2**30)  # under the limit: kept
    kept_under = rss() - base
    release_heap_above(2**20)  # over it: given back
    released = rss() - base
print(json.dumps({"mallinfo2": hasattr(_LIBC, "mallinfo2"), "kept": kept, "free": free, "kept_under": kept_under,
                  "released": released}))
"""


def test_what_a_run_keeps_is_bounded():
    """``release_heap_above`` keeps the free heap under its limit and gives it back past it."""
    out = subprocess.run([sys.executable, "-c", _RELEASE], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    if not r["mallinfo2"]:
        pytest.skip("needs glibc 2.33 or later (mallinfo2): elsewhere nothing is released")
    gib = 2**30
    assert r["kept"] > 0.9 * gib and r["free"] > 0.9 * gib, r
    assert r["kept_under"] > 0.9 * gib, r
    assert r["released"] < 0.1 * gib, r
