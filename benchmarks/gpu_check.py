"""The CUDA path checked in one short run on one GPU (benchmarks/gpu_check.sh calls this).

    benchmarks/gpu_check.sh               # on the GPU machine: about 3-4 minutes
    benchmarks/gpu_check.sh --dry-run     # everything tiny, on the CPU (tests/test_gpu_check.py)

Parts, each in a process of its own (a CUDA error cannot poison the next) with a time limit, all
within one overall deadline (--minutes), so that one failure or one slow part stops nothing else:

- ``tests``: the test files marked ``cuda``, ``pytest -m cuda``;
- ``parity``: vqcli on CUDA against vqcli on the CPU, SD VAE architecture, random weights, float32
  (TF32 off, and as run by default), bfloat16 and float16;
- ``torchrun``: an NCCL all-reduce under torchrun on one GPU, then ``torchrun -m vqcli encode
  --device cuda`` over a few images;
- ``decode_4096``: a 4096 px decode in bands under a fixed memory budget: seconds and peak GPU
  memory (``torch.cuda.max_memory_allocated``);
- ``speed``: encode and decode at 512 and 1024 px against diffusers' AutoencoderKL (same random
  weights) in float32, bfloat16 and float16: median milliseconds of CUDA-event-timed calls after
  warm-up, implementations taking turns; vqcli also in the other memory format and torch.compile'd
  (bfloat16, as time allows).

Writes ``gpu_check.json`` and ``gpu_check.md`` under --out and prints the Markdown at the end.
The diffusers model is run the way its users run it (``.to(dtype)``, eager); vqcli the way the CLI
does (``compute_model``: on CUDA in reduced precision a copy with cast weights, the output layers
kept float32; ``compute_context`` with its memory bound; maps in ``memory_format_for``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

DTYPES = ("float32", "bfloat16", "float16")
GiB = 2**30

# each part: its own time limit in seconds on the GPU (the overall deadline cuts it shorter)
PARTS = {"parity": 90, "tests": 120, "torchrun": 90, "decode_4096": 100, "speed": 240}


# --- what a run measures, by mode ------------------------------------------------------------------


def plan(dry: bool) -> dict:
    """Sizes and repeats: the GPU run's, or the dry run's (tiny, on the CPU)."""
    if dry:
        return dict(device="cpu", arch="tiny", parity_size=32, big_latent=32, big_budget=2**19,
                    compare_untiled=True, shapes=[(32, 1)], warmup=1, repeats=1, compile=[],
                    images=2, image_size=32, cudagraph=[])
    return dict(device="cuda", arch="sd", parity_size=256, big_latent=512, big_budget=8 * GiB,
                compare_untiled=False, shapes=[(512, 1), (512, 4), (1024, 1)], warmup=2,
                repeats={512: 10, 1024: 6}, compile=[("decode", 1024, 1), ("encode", 1024, 1), ("decode", 512, 1)],
                cudagraph=[("decode", 1024, 1), ("decode", 512, 1), ("encode", 1024, 1)], images=4, image_size=512)


# --- vqcli ----------------------------------------------------------------------------------------


class _API:
    """The few vqcli functions used here."""

    def __init__(self):
        from vqcli import AutoEncoder
        from vqcli.checkpoints.infer import infer_config
        from vqcli.checkpoints.layouts import to_original
        from vqcli.checkpoints.native import save_native
        from vqcli.speed.budget import default_budget
        from vqcli.speed.context import compute_context, compute_model, memory_format_for, prepare_model

        self.AutoEncoder, self.infer_config, self.to_original, self.save = AutoEncoder, infer_config, to_original, save_native
        self.compute_context, self.prepare_model, self.default_budget = compute_context, prepare_model, default_budget
        self.compute_model, self.memory_format_for = compute_model, memory_format_for


def build_models(arch: str):
    """diffusers' AutoencoderKL (SD architecture, or a tiny one) and vqcli's twin, same random weights."""
    import torch
    from diffusers import AutoencoderKL

    api = _API()
    if arch == "sd":
        kw = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512)
    else:
        kw = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=32)
    n = len(kw["block_out_channels"])
    torch.manual_seed(0)
    reference = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, latent_channels=4, norm_num_groups=32, **kw,
    ).eval()
    state = api.to_original(reference.state_dict())
    ours = api.AutoEncoder(api.infer_config(state, source=f"diffusers AutoencoderKL ({arch})"))
    ours.load_state_dict(state, strict=True)
    return api, reference, ours.eval()


def rel_diff(a, b) -> float:
    """max |a - b| / max |b| (inf where either is not finite)."""
    import torch

    a, b = a.float().cpu(), b.float().cpu()
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        return math.inf
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def psnr(a, b) -> float:
    """dB between two images in [-1, 1] (clamped), as ``--dtype auto`` measures it."""
    a, b = a.float().cpu().clamp(-1, 1), b.float().cpu().clamp(-1, 1)
    mse = float(((a - b) / 2).pow(2).mean())
    return math.inf if mse == 0 else -10 * math.log10(mse) if math.isfinite(mse) else -math.inf


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_ms(fn, device) -> float:
    """Milliseconds of one call: CUDA events on a GPU (the queue drained before), else the clock."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e3


# --- the parts, each run in a process of its own ---------------------------------------------------

_RESULT_FILE: Path | None = None


def progress(result: dict) -> None:
    """Write a part's result so far: a part stopped at its time limit still reports what it did."""
    if _RESULT_FILE is not None:
        _RESULT_FILE.write_text(json.dumps(dict(result, ok=False, partial=True), indent=2, default=str))



def part_parity(p: dict, deadline: float) -> dict:
    """vqcli's encode and decode on the device against the CPU's float32 result."""
    import torch

    api, _, model = build_models(p["arch"])
    device = torch.device(p["device"])
    f = model.config.downsampling
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, p["parity_size"], p["parity_size"], generator=g) * 2 - 1
    z = torch.randn(1, 4, p["parity_size"] // f, p["parity_size"] // f, generator=g)

    def run(m, dev, dtype):
        runner = api.compute_model(api.prepare_model(m, dev, dtype), dev, dtype)
        fmt = api.memory_format_for(dtype, dev)
        with api.compute_context(dev, dtype, model=runner):
            enc = runner.encode(x.to(dev).contiguous(memory_format=fmt)).float().cpu()
            dec = runner.decode(z.to(dev).contiguous(memory_format=fmt)).float().cpu()
        return enc, dec

    cpu_enc, cpu_dec = run(copy.deepcopy(model), torch.device("cpu"), torch.float32)
    on_device = model.to(device)
    rows = []
    cases = [("float32, TF32 off", torch.float32, False), ("float32 (defaults)", torch.float32, None),
             ("bfloat16", torch.bfloat16, None), ("float16", torch.float16, None)]
    for label, dtype, tf32 in cases:
        saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        if tf32 is not None:
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            enc, dec = run(on_device, device, dtype)
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
        rows.append({"case": label, "encode_rel_diff": rel_diff(enc, cpu_enc), "decode_rel_diff": rel_diff(dec, cpu_dec),
                     "decode_psnr_db": psnr(dec, cpu_dec), "output_device_ok": True})
    strict = rows[0]
    ok = max(strict["encode_rel_diff"], strict["decode_rel_diff"]) < 1e-4 and all(
        r["decode_psnr_db"] >= 30 for r in rows[1:])
    return {"ok": ok, "size": p["parity_size"], "tolerance": "float32 (TF32 off) rel diff < 1e-4; others >= 30 dB",
            "cudnn_tf32_default": torch.backends.cudnn.allow_tf32, "rows": rows,
            "headline": f"float32 rel diff enc {strict['encode_rel_diff']:.1e} dec {strict['decode_rel_diff']:.1e}; "
                        + ", ".join(f"{r['case']} {r['decode_psnr_db']:.0f} dB" for r in rows[1:])}


def part_decode_4096(p: dict, deadline: float) -> dict:
    """A 4096 px decode (the dry run: a small one) in bands under a fixed budget: time and peak memory."""
    import torch

    api, _, model = build_models(p["arch"])
    device = torch.device(p["device"])
    n = p["big_latent"]
    z = torch.randn(1, 4, n, n, generator=torch.Generator().manual_seed(2))
    out = {"ok": True, "image_px": n * model.config.downsampling, "budget_mb": round(p["big_budget"] / 2**20, 2),
           "default_budget_gb": round(api.default_budget(device) / GiB, 2), "rows": []}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        out["gpu_free_gb"], out["gpu_total_gb"] = round(free / GiB, 1), round(total / GiB, 1)
    untiled = None
    for dtype_name in ("bfloat16", "float32"):
        if time.time() > deadline - 15:
            out["rows"].append({"dtype": dtype_name, "skipped": "out of time"})
            continue
        dtype = getattr(torch, dtype_name)
        runner = api.compute_model(api.prepare_model(model, device, dtype), device, dtype)
        zin = z.to(device).contiguous(memory_format=api.memory_format_for(dtype, device))
        y = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0

        def decode(budget=p["big_budget"]):
            nonlocal y
            with api.compute_context(device, dtype, model=runner, budget=budget):
                y = runner.decode(zin)

        ms = call_ms(decode, device)
        row = {"dtype": dtype_name, "seconds": round(ms / 1e3, 2), "finite": bool(torch.isfinite(y).all()),
               "shape": list(y.shape)}
        if device.type == "cuda":
            row["peak_gb"] = round((torch.cuda.max_memory_allocated(device) - base) / GiB, 2)
            row["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved(device) / GiB, 2)
        if p["compare_untiled"] and dtype == torch.float32:
            tiled = y.float().cpu()
            decode(budget=2**62)
            untiled = y.float().cpu()
            row["rel_diff_vs_untiled"] = rel_diff(tiled, untiled)
        out["ok"] = out["ok"] and row["finite"] and row.get("rel_diff_vs_untiled", 0) < 1e-4
        out["rows"].append(row)
        progress(out)
        del y, zin, runner
    done = [r for r in out["rows"] if "seconds" in r]
    out["headline"] = "; ".join(
        f"{r['dtype']} {r['seconds']} s" + (f", peak {r['peak_gb']} GB" if "peak_gb" in r else "") for r in done)
    out["headline"] += f" (budget {out['budget_mb']} MB)"
    return out


def part_speed(p: dict, deadline: float) -> dict:
    """Encode and decode against diffusers: median ms, images/s, ratios, output differences."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    api, reference, model = build_models(p["arch"])
    device = torch.device(p["device"])
    reference = reference.to(device)
    model = model.to(device)
    f = model.config.downsampling
    refs = {d: reference if d == "float32" else copy.deepcopy(reference).to(getattr(torch, d)) for d in DTYPES}

    def other_format(dtype):
        """The memory format vqcli does not run ``dtype`` in on this device."""
        ours = api.memory_format_for(dtype, device)
        return torch.channels_last if ours == torch.contiguous_format else torch.contiguous_format

    vq = {}
    for d in DTYPES:
        dtype = getattr(torch, d)
        vq[d] = api.prepare_model(copy.deepcopy(model), device, dtype)
        # the same model (fast paths included) in the other memory format
        vq[d + " alt"] = api.prepare_model(copy.deepcopy(model), device, dtype).to(memory_format=other_format(dtype))
    rows = []
    repeats = p["repeats"]
    for size, batch in p["shapes"]:
        reps = repeats if isinstance(repeats, int) else repeats[size]
        g = torch.Generator().manual_seed(size + batch)
        x = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device)
        z = torch.randn(batch, 4, size // f, size // f, generator=g).to(device)
        for op in ("encode", "decode"):
            inp = x if op == "encode" else z
            base_out = None
            flops = None
            for d in DTYPES:
                if time.time() > deadline - 20:
                    rows.append({"op": op, "size": size, "batch": batch, "dtype": d, "skipped": "out of time"})
                    continue
                dtype = getattr(torch, d)
                impls = {"diffusers": _diffusers_fn(refs[d], op, inp.to(dtype))}
                fmt = api.memory_format_for(dtype, device)
                impls["vqcli"] = _vqcli_fn(api, vq[d], device, dtype, op, inp.contiguous(memory_format=fmt))
                alt_name = "vqcli NHWC" if other_format(dtype) == torch.channels_last else "vqcli NCHW"
                impls[alt_name] = _vqcli_fn(api, vq[d + " alt"], device, dtype, op,
                                            inp.contiguous(memory_format=other_format(dtype)))
                if flops is None:
                    with FlopCounterMode(display=False) as counter:
                        impls["diffusers"]()
                    flops = counter.get_total_flops()
                outs = {name: fn() for name, fn in impls.items()}  # warm-up, and the outputs
                for _ in range(p["warmup"] - 1):
                    for fn in impls.values():
                        fn()
                times = {name: [] for name in impls}
                for _ in range(reps):
                    for name, fn in impls.items():
                        times[name].append(call_ms(fn, device))
                if d == "float32":
                    base_out = outs["diffusers"]
                med = {name: statistics.median(t) for name, t in times.items()}
                for name in impls:
                    rows.append(_speed_row(op, size, batch, d, name, med[name], med["diffusers"], flops,
                                           rel_diff(outs[name], base_out), len(times[name])))
                print(" ".join(f"{op} {size} b{batch} {d} {k} {v:.2f} ms" for k, v in med.items()), flush=True)
                progress({"rows": rows})
    # bfloat16 eager vqcli replayed from a CUDA graph (cheap: no compiling), then torch.compile'd
    # (the CLI's --compile, a fresh model per shape), as time allows
    variants = [("cudagraph", shape, 20) for shape in p["cudagraph"]] + [("compile", shape, 60) for shape in p["compile"]]
    for kind, (op, size, batch), needs in variants:
        if time.time() > deadline - needs:
            rows.append({"op": op, "size": size, "batch": batch, "dtype": "bfloat16", "impl": f"vqcli {kind}",
                         "skipped": "out of time"})
            continue
        try:
            rows.append(_variant_row(kind, api, model, reference, rows, device, op, size, batch, p))
        except Exception as e:  # noqa: BLE001 - a failed variant is a finding, not the end of the run
            rows.append({"op": op, "size": size, "batch": batch, "dtype": "bfloat16", "impl": f"vqcli {kind}",
                         "error": _last_line(e)})
        print(f"{kind} {op} {size} b{batch}: {rows[-1].get('ms', rows[-1].get('error'))}", flush=True)
        progress({"rows": rows})
    head = ", ".join(_headline(rows, size, batch) for size, batch in p["shapes"] if batch == 1)
    ok = all(r.get("finite", True) for r in rows if "ms" in r and r["dtype"] != "float16")
    return {"ok": ok, "rows": rows, "headline": head,
            "cudnn_tf32": torch.backends.cudnn.allow_tf32 if device.type == "cuda" else None}


def _headline(rows: list[dict], size: int, batch: int) -> str:
    """bfloat16 decode at ``size``: diffusers eager, vqcli as the CLI runs it, and vqcli's best variant."""
    mine = [r for r in rows if (r.get("op"), r.get("size"), r.get("batch"), r.get("dtype")) == ("decode", size, batch, "bfloat16")
            and "ms" in r]
    diffusers = next((r["ms"] for r in mine if r["impl"] == "diffusers"), None)
    ours = [r for r in mine if r["impl"].startswith("vqcli")]
    if not ours or diffusers is None:
        return f"bf16 decode {size}: not measured"
    plain = next((r for r in ours if r["impl"] == "vqcli"), ours[0])
    best = min(ours, key=lambda r: r["ms"])
    text = f"bf16 decode {size}: diffusers {diffusers:.1f} ms, vqcli {plain['ms']:.1f} ms ({diffusers / plain['ms']:.2f}x)"
    if best is not plain:
        text += f", {best['impl']} {best['ms']:.1f} ms ({diffusers / best['ms']:.2f}x)"
    return text


def _diffusers_fn(ref, op, inp):
    import torch

    def fn():
        with torch.inference_mode():
            return ref.encode(inp).latent_dist.mode() if op == "encode" else ref.decode(inp).sample

    return fn


def _vqcli_fn(api, model, device, dtype, op, inp, **context):
    """``op`` as a run computes it: the model ``compute_model`` gives (made here, before any
    timing: a run makes it once), in ``compute_context``."""
    runner = api.compute_model(model, device, dtype)

    def fn():
        with api.compute_context(device, dtype, model=runner, **context):
            return runner.encode(inp) if op == "encode" else runner.decode(inp)

    return fn


def _speed_row(op, size, batch, dtype, impl, ms, diffusers_ms, flops, diff, n) -> dict:
    return {"op": op, "size": size, "batch": batch, "dtype": dtype, "impl": impl, "ms": round(ms, 3),
            "images_per_s": round(batch / ms * 1e3, 2), "tflops": round(flops / ms / 1e9, 1),
            "vs_diffusers_same_dtype": round(diffusers_ms / ms, 2), "rel_diff_vs_diffusers_fp32": float(f"{diff:.2e}"),
            "finite": math.isfinite(diff), "repeats": n}


def _graphed(fn, device):
    """``fn``'s GPU work captured once in a CUDA graph: the function returned replays it (on the
    same input tensor, into the same output tensor)."""
    import torch

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # (warm-up off the default stream, as capture wants)
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out

    return replay


def _variant_row(kind, api, model, reference, rows, device, op, size, batch, p) -> dict:
    import torch

    dtype = torch.bfloat16
    f = model.config.downsampling
    g = torch.Generator().manual_seed(size + batch)
    x = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device)
    z = torch.randn(batch, 4, size // f, size // f, generator=g).to(device)
    inp = (x if op == "encode" else z).contiguous(memory_format=api.memory_format_for(dtype, device))
    fresh = api.prepare_model(copy.deepcopy(model), device, dtype)
    started = time.perf_counter()
    if kind == "compile":
        fn = _vqcli_fn(api, fresh, device, dtype, op, inp, compile=True)
    else:  # (a fixed budget: nothing asks the device for its free memory while capturing)
        fn = _graphed(_vqcli_fn(api, fresh, device, dtype, op, inp, budget=2**40), device)
    out = fn()
    _sync(device)
    setup_s = time.perf_counter() - started
    for _ in range(p["warmup"]):
        fn()
    reps = p["repeats"] if isinstance(p["repeats"], int) else p["repeats"][size]
    ms = statistics.median(call_ms(fn, device) for _ in range(reps))
    same = [r for r in rows if (r.get("op"), r.get("size"), r.get("batch"), r.get("dtype")) == (op, size, batch, "bfloat16")]
    diffusers_ms = next((r["ms"] for r in same if r.get("impl") == "diffusers"), None)
    eager_ms = next((r["ms"] for r in same if r.get("impl") == "vqcli"), None)
    with torch.inference_mode():
        ref = reference.encode(x).latent_dist.mode() if op == "encode" else reference.decode(z).sample
    return {"op": op, "size": size, "batch": batch, "dtype": "bfloat16", "impl": f"vqcli {kind}", "ms": round(ms, 3),
            "images_per_s": round(batch / ms * 1e3, 2),
            "vs_diffusers_same_dtype": diffusers_ms and round(diffusers_ms / ms, 2),
            "vs_vqcli_eager": eager_ms and round(eager_ms / ms, 2), "setup_s": round(setup_s, 1),
            "rel_diff_vs_diffusers_fp32": float(f"{rel_diff(out, ref):.2e}"), "finite": bool(torch.isfinite(out).all()),
            "repeats": reps}


def part_nccl_probe(p: dict, deadline: float) -> dict:
    """Under torchrun: an all-reduce over NCCL (gloo on the CPU) between the processes."""
    import torch
    import torch.distributed as dist

    device = torch.device(p["device"])
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    try:
        t = torch.ones(4, device=device) * (dist.get_rank() + 1)
        dist.all_reduce(t)
        world = dist.get_world_size()
        expect = world * (world + 1) / 2
        dist.barrier()
        return {"ok": bool((t == expect).all()), "backend": backend, "world_size": world, "sum": t.tolist()}
    finally:
        dist.destroy_process_group()


# --- parts run from the driver: tests and torchrun ------------------------------------------------


def cuda_test_files() -> list[str]:
    """Test files that mark tests ``cuda`` (only these are collected: a module that needs a package
    the GPU machine lacks cannot stop the collection)."""
    found = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        if re.search(r"mark\.cuda\b", path.read_text(errors="replace")):
            found.append(str(path.relative_to(ROOT)))
    return found


def run_tests(p: dict, timeout: float, env: dict) -> dict:
    files = cuda_test_files()
    if not files:
        return {"ok": False, "error": "no test file marks tests cuda"}
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-rs",
           "--continue-on-collection-errors", *files]
    r = _subprocess(cmd, timeout, env)
    tail = r["output"].strip().splitlines()
    summary = next((line for line in reversed(tail) if re.search(r"\d+ (passed|failed|skipped|deselected|error)", line)), "")
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", summary)}
    ok = r["rc"] == 0 and counts.get("passed", 0) + (counts.get("skipped", 0) if p["device"] == "cpu" else 0) > 0
    return {"ok": ok, "rc": r["rc"], "files": files, "counts": counts, "headline": summary.strip("= "),
            "output_tail": "\n".join(tail[-40:])}


def run_torchrun(p: dict, timeout: float, env: dict, driver_args: list[str]) -> dict:
    """An NCCL all-reduce under torchrun, then ``torchrun -m vqcli encode`` over a few images."""
    started = time.time()
    out = {"ok": False}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        probe = _subprocess(launcher + [__file__, "--part", "nccl_probe", "--result", str(tmp / "probe.json"), *driver_args],
                            timeout / 2, env)
        out["nccl_probe"] = _read_json(tmp / "probe.json") or {"ok": False, "rc": probe["rc"], "output_tail": probe["output"][-3000:]}
        # a few images and a model file for the CLI
        import numpy as np
        from PIL import Image

        api, _, model = build_models(p["arch"])
        model_file = tmp / "model.safetensors"
        api.save(model, model_file)
        images = tmp / "images"
        images.mkdir()
        rng = np.random.default_rng(3)
        for i in range(p["images"]):
            side = p["image_size"] - 8 * i  # sizes differ: batches of one shape each
            arr = rng.integers(0, 256, (side, p["image_size"], 3), dtype=np.uint8)
            Image.fromarray(arr).save(images / f"{i}.png")
        latents = tmp / "latents"
        cmd = launcher + ["-m", "vqcli", "encode", str(images), "-o", str(latents), "--model", str(model_file),
                          "--device", p["device"], "--dtype", "auto" if p["device"] == "cuda" else "float32", "--json"]
        left = max(10.0, timeout - (time.time() - started))
        r = _subprocess(cmd, left, env)
        written = sorted(q.name for q in latents.rglob("*.safetensors")) if latents.exists() else []
        summary = _last_json(r["output"])
        out.update({"rc": r["rc"], "latents_written": len(written), "images": p["images"], "summary": summary,
                    "output_tail": r["output"][-3000:]})
        out["ok"] = bool(out["nccl_probe"].get("ok")) and r["rc"] == 0 and len(written) == p["images"]
    out["headline"] = (f"NCCL probe {'ok' if out['nccl_probe'].get('ok') else 'FAILED'} "
                       f"({out['nccl_probe'].get('backend', '?')}); torchrun vqcli encode rc {out.get('rc')}, "
                       f"{out.get('latents_written')}/{p['images']} latents"
                       + (f", dtype {out['summary'].get('dtype')}" if isinstance(out.get("summary"), dict) else ""))
    return out


def _subprocess(cmd: list[str], timeout: float, env: dict) -> dict:
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=max(1.0, timeout))
        return {"rc": r.returncode, "output": r.stdout}
    except subprocess.TimeoutExpired as e:
        text = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {"rc": "timeout", "output": text + f"\n(timed out after {timeout:.0f} s)"}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_json(text: str):
    """The last JSON object in ``text`` (the CLI's --json summary, among other lines)."""
    for start in [m.start() for m in re.finditer(r"^\{", text, re.M)][::-1]:
        try:
            return json.JSONDecoder().raw_decode(text[start:])[0]
        except ValueError:
            continue
    return None


def _last_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


# --- the driver -------------------------------------------------------------------------------------


def drive(args) -> int:
    from machine import describe, summary

    p = plan(args.dry_run)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    deadline = started + args.minutes * 60
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [q for q in env.get("PYTHONPATH", "").split(os.pathsep) if q])
    machine = describe()
    print(summary(machine), flush=True)
    report = {"dry_run": args.dry_run, "machine": machine, "plan": {k: str(v) for k, v in p.items()},
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "parts": {}}
    driver_args = ["--dry-run"] if args.dry_run else []
    wanted = args.parts or list(PARTS)
    for name in wanted:
        t0 = time.time()
        limit = min(PARTS[name] * (3 if args.dry_run else 1), deadline - t0)
        if limit < 5:
            report["parts"][name] = {"ok": False, "skipped": "out of time"}
            continue
        print(f"--- {name} (up to {limit:.0f} s)", flush=True)
        try:
            if name == "tests":
                result = run_tests(p, limit, env)
            elif name == "torchrun":
                result = run_torchrun(p, limit, env, driver_args)
            else:
                result = _in_process_of_its_own(name, limit, env, driver_args, t0 + limit)
        except Exception as e:  # noqa: BLE001 - one part's failure is reported, the others still run
            result = {"ok": False, "error": _last_line(e), "traceback": traceback.format_exc()[-3000:]}
        result["seconds"] = round(time.time() - t0, 1)
        report["parts"][name] = result
        print(f"    {'ok' if result.get('ok') else 'FAILED'} in {result['seconds']} s: "
              f"{result.get('headline') or result.get('error') or result.get('skipped', '')}", flush=True)
        (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))  # (kept as it goes)
    report["seconds"] = round(time.time() - started, 1)
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    md = markdown(report)
    (out_dir / "gpu_check.md").write_text(md)
    print(md)
    return 0 if all(r.get("ok") for r in report["parts"].values()) else 1


def _in_process_of_its_own(name: str, limit: float, env: dict, driver_args: list[str], deadline: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--part", name, "--result", str(result_file), "--deadline", str(deadline),
               *driver_args]
        r = _subprocess(cmd, limit, env)
        result = _read_json(result_file)
        if result is None:
            result = {"ok": False, "error": f"exit {r['rc']} with no result", "output_tail": r["output"][-4000:]}
        elif r["rc"] == "timeout":
            result.update(ok=False, error=f"stopped at its time limit ({limit:.0f} s); the rows done are kept",
                          output_tail=r["output"][-4000:])
        elif r["rc"] != 0:
            result.setdefault("output_tail", r["output"][-4000:])
        return result


def run_part(args) -> int:
    global _RESULT_FILE
    p = plan(args.dry_run)
    if args.part != "nccl_probe":
        _RESULT_FILE = Path(args.result)
    fn = {"parity": part_parity, "decode_4096": part_decode_4096, "speed": part_speed, "nccl_probe": part_nccl_probe}[args.part]
    try:
        result = fn(p, args.deadline or time.time() + 3600)
    except Exception as e:  # noqa: BLE001 - written down for the driver
        result = {"ok": False, "error": _last_line(e), "traceback": traceback.format_exc()[-4000:]}
    if args.part == "nccl_probe" and int(os.environ.get("RANK", 0)) != 0:
        return 0
    Path(args.result).write_text(json.dumps(result, indent=2, default=str))
    return 0 if result.get("ok") else 1


# --- the report ---------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    from machine import summary

    lines = [f"## vqcli GPU check{' (dry run, CPU)' if report['dry_run'] else ''}", "",
             summary(report["machine"]), "", "| part | result | seconds | what |", "|---|---|---|---|"]
    for name, r in report["parts"].items():
        status = "ok" if r.get("ok") else ("skipped" if r.get("skipped") else "FAILED")
        what = r.get("headline") or r.get("error") or r.get("skipped") or ""
        lines.append(f"| {name} | {status} | {r.get('seconds', '')} | {str(what).replace('|', '/')} |")
    speed = report["parts"].get("speed", {}).get("rows", [])
    if speed:
        lines += ["", "| op | size | B | dtype | implementation | ms | img/s | TFLOP/s | vs diffusers (same dtype) | rel diff vs diffusers fp32 |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in speed:
            if "ms" not in r:
                lines.append(f"| {r['op']} | {r['size']} | {r['batch']} | {r['dtype']} | {r.get('impl', '')} | "
                             f"{r.get('skipped') or r.get('error')} | | | | |")
                continue
            extra = f" (setup {r['setup_s']} s, {r['vs_vqcli_eager']}x eager)" if "setup_s" in r else ""
            lines.append(f"| {r['op']} | {r['size']} | {r['batch']} | {r['dtype']} | {r['impl']}{extra} | {r['ms']:.2f} | "
                         f"{r['images_per_s']:.1f} | {r.get('tflops', '')} | {_ratio(r['vs_diffusers_same_dtype'])} | "
                         f"{r['rel_diff_vs_diffusers_fp32']:.1e} |")
    big = report["parts"].get("decode_4096", {})
    if big.get("rows"):
        lines += ["", f"Large decode ({big.get('image_px')} px, budget {big.get('budget_mb')} MB; "
                      f"vqcli's default budget here {big.get('default_budget_gb')} GB):", "",
                  "| dtype | seconds | peak GB (allocated) | peak GB (reserved) | finite | rel diff vs untiled |",
                  "|---|---|---|---|---|---|"]
        for r in big["rows"]:
            lines.append(f"| {r['dtype']} | {r.get('seconds', r.get('skipped'))} | {r.get('peak_gb', '')} | "
                         f"{r.get('peak_reserved_gb', '')} | {r.get('finite', '')} | {r.get('rel_diff_vs_untiled', '')} |")
    lines.append(f"\nTotal {report.get('seconds')} s.")
    return "\n".join(lines) + "\n"


def _ratio(x) -> str:
    return "" if x is None else f"{x:.2f}x"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="everything tiny, on the CPU")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu_check"))
    parser.add_argument("--minutes", type=float, default=4.0, help="overall deadline")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), help="only these parts")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        return run_part(args)
    return drive(args)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
