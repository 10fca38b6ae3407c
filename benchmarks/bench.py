"""vqcli against diffusers' AutoencoderKL on identical weights, in one process and one run.

    python benchmarks/bench.py                      # the full table recorded in the README
    python benchmarks/bench.py --sizes 256 --batches 1 --repeat 1

Prints the machine first (CPU model, cores, AMX / AVX512-BF16, torch, GPU; benchmarks/machine.py), then,
for encode and decode at each size, batch and dtype: seconds per batch, images/s,
achieved GFLOP/s (FLOPs counted once per shape with torch.utils.flop_counter), peak RSS during the
measurement, the ratio to diffusers float32 and the output difference to diffusers. The
implementations of one job take turns (diffusers, vqcli float32, vqcli bfloat16, then again for
each --repeat), so that a machine whose speed drifts during the run skews no ratio. The machine's
peak is measured in the same run (a large matmul and a 3x3 convolution). vqcli is timed as in a
CLI run past its first image, with the heap the run keeps (see timed_in_turn). With --e2e it also
times `vqcli encode` + `vqcli decode` over a folder of photographs against the plain diffusers loop
a user would write (load image, encode, save safetensors; load, decode, save PNG).

Weights are random (timing does not depend on them) and built once in diffusers' layout, then
mapped into vqcli's with vqcli.layouts.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vqcli import AutoEncoder  # noqa: E402
from vqcli.checkpoints.infer import infer_config
from vqcli.checkpoints.layouts import to_original
from vqcli.checkpoints.native import save_native
from vqcli.speed.context import compute_context, prepare_model
from vqcli.speed.heap import fast_allocator


class PeakRSS:
    """Peak resident set size while inside, sampled every 2 ms from /proc/self/statm."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __enter__(self):
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def timed_in_turn(impls: list[tuple[str, object, object]], repeat: int) -> dict[str, tuple[float, int, object]]:
    """``timed`` for several implementations of one job, taking turns: each is warmed up once, then
    the rounds run each of them once, in order, ``repeat`` times. A machine that slows down or
    speeds up during the run (a shared host does) then affects all of them alike, where timing one
    after the other put the whole drift into their ratio. An implementation is ``(name, fn, hold)``:
    with ``hold`` (a context manager factory), its turns run inside ``hold()``, after one untimed
    call: vqcli's turns hold ``accel.fast_allocator``, as a CLI run does from its first image to its
    last, so that the timed call is an image past a run's first (its heap already paged in). The
    setting is process-wide: diffusers' turns run without it, as a user's script would. Per name:
    best seconds, the peak RSS during its own timed calls, its warm-up output."""
    outputs = {name: fn() for name, fn, _ in impls}
    best = {name: float("inf") for name, _, _ in impls}
    peak = {name: 0 for name, _, _ in impls}
    for _ in range(repeat):
        for name, fn, hold in impls:
            with hold() if hold else contextlib.nullcontext():
                if hold:
                    fn()
                with PeakRSS() as rss:
                    start = time.perf_counter()
                    fn()
                    best[name] = min(best[name], time.perf_counter() - start)
            peak[name] = max(peak[name], rss.peak)
    return {name: (best[name], peak[name], outputs[name]) for name, _, _ in impls}


def timed(fn, repeat: int) -> tuple[float, int, object]:
    """Best-of-``repeat`` seconds after one warm-up call, the peak RSS and the last output."""
    out = fn()
    best = float("inf")
    with PeakRSS() as rss:
        for _ in range(repeat):
            start = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - start)
    return best, rss.peak, out


def machine_peak(threads: int) -> dict:
    """GFLOP/s of a large matmul and a 3x3 convolution, float32 and bfloat16."""
    results = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a = torch.randn(2048, 2048, dtype=dtype)
        b = torch.randn(2048, 2048, dtype=dtype)
        seconds, _, _ = timed(lambda: a @ b, 3)
        results[f"matmul_{name}"] = 2 * 2048**3 / seconds / 1e9
        conv = torch.nn.Conv2d(128, 128, 3, padding=1).to(dtype)
        x = torch.randn(1, 128, 256, 256, dtype=dtype)
        if dtype != torch.float32:
            conv = conv.to(memory_format=torch.channels_last)
            x = x.to(memory_format=torch.channels_last)
        with torch.inference_mode():
            seconds, _, _ = timed(lambda: conv(x), 3)
        results[f"conv3x3_{name}"] = 2 * 128 * 128 * 9 * 256 * 256 / seconds / 1e9
    return results


def build_models(args) -> tuple[torch.nn.Module, AutoEncoder]:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    reference = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
    ).eval()
    state = to_original(reference.state_dict())
    config = infer_config(state, source="diffusers AutoencoderKL")
    ours = AutoEncoder(config)
    ours.load_state_dict(state, strict=True)
    return reference, ours.eval()


def bench_models(args, reference, ours) -> list[dict]:
    rows = []
    f = ours.config.downsampling
    # one copy of the model per precision, each in its memory format: they take turns in the timing
    # (the peak RSS is the process's: diffusers' model and these copies are all in it)
    prepared = {d: prepare_model(ours if i == 0 else copy.deepcopy(ours), torch.device("cpu"), getattr(torch, d))
                for i, d in enumerate(args.dtypes)}
    for size in args.sizes:
        for batch in args.batches:
            torch.manual_seed(size + batch)
            x = torch.rand(batch, 3, size, size) * 2 - 1
            z = torch.randn(batch, ours.config.embed_dim, size // f, size // f)
            for op in ("encode", "decode"):
                inp = x if op == "encode" else z

                def diffusers_fn():
                    with torch.inference_mode():
                        if op == "encode":
                            return reference.encode(inp).latent_dist.mode()
                        return reference.decode(inp).sample

                flops = count_flops(diffusers_fn)
                impls = [("diffusers float32", diffusers_fn, None)]
                for dtype_name, compiled in [(d, c) for d in args.dtypes for c in [False] + [True] * args.compile]:
                    dtype = getattr(torch, dtype_name)
                    impl = f"vqcli {dtype_name}" + (" comp." if compiled else "")
                    impls.append((impl, _ours_fn(prepared[dtype_name], op, inp, dtype, compiled), fast_allocator))
                results = timed_in_turn(impls, args.repeat)
                base_s, _, base_out = results["diffusers float32"]
                for impl, (seconds, rss, out) in results.items():
                    rel = None
                    if impl != "diffusers float32":
                        rel = (out - base_out).abs().max().item() / max(base_out.abs().max().item(), 1e-12)
                    rows.append(_row(op, size, batch, impl, seconds, rss, flops, base_s, rel))
                    print(_fmt(rows[-1]), flush=True)
    return rows


def _ours_fn(model, op: str, inp: torch.Tensor, dtype: torch.dtype, compiled: bool):
    """vqcli's encode or decode of ``inp`` in ``dtype``, as the CLI runs it (``model`` prepared for
    ``dtype``, the compute context; --compile through the memory bound, unlimited here: the warm-up
    call, not timed, compiles)."""
    fmt_in = inp.contiguous(memory_format=torch.channels_last) if dtype != torch.float32 else inp
    context = dict(model=model, budget=2**62, compile=True) if compiled else {}

    def fn():
        with compute_context(torch.device("cpu"), dtype, **context):
            out = model.encode(fmt_in) if op == "encode" else model.decode(fmt_in)
        return out.float()

    return fn


def _row(op, size, batch, impl, seconds, rss, flops, base_seconds, rel_diff) -> dict:
    return {
        "op": op,
        "size": size,
        "batch": batch,
        "impl": impl,
        "seconds": round(seconds, 3),
        "images_per_s": round(batch / seconds, 3),
        "gflops": round(flops / seconds / 1e9, 1),
        "peak_rss_gb": round(rss / 2**30, 2),
        "speedup_vs_diffusers_fp32": round(base_seconds / seconds, 2),
        "max_rel_diff_vs_diffusers": None if rel_diff is None else float(f"{rel_diff:.2e}"),
    }


def _fmt(r: dict) -> str:
    diff = "" if r["max_rel_diff_vs_diffusers"] is None else f"{r['max_rel_diff_vs_diffusers']:.1e}"
    return (
        f"| {r['op']:6} | {r['size']:4} | {r['batch']} | {r['impl']:18} | {r['seconds']:7.3f} | "
        f"{r['images_per_s']:6.2f} | {r['gflops']:6.1f} | {r['peak_rss_gb']:5.2f} | "
        f"{r['speedup_vs_diffusers_fp32']:5.2f}x | {diff:>7} |"
    )


HEADER = (
    "| op     | size | B | implementation     | s/batch |  img/s | GFLOP/s | RSS GB | vs diffusers | rel diff |\n"
    "|--------|------|---|--------------------|---------|--------|---------|--------|--------------|----------|"
)

DIFFUSERS_LOOP = r'''
import sys, torch, numpy as np
from pathlib import Path
from PIL import Image
from safetensors.torch import save_file, load_file
from diffusers import AutoencoderKL
src, model_dir, lat, rec = map(Path, sys.argv[1:5])
vae = AutoencoderKL.from_pretrained(model_dir).eval()
lat.mkdir(parents=True, exist_ok=True); rec.mkdir(parents=True, exist_ok=True)
with torch.no_grad():
    for p in sorted(src.iterdir()):
        im = np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1
        h, w = im.shape[:2]; H, W = -(-h // 8) * 8, -(-w // 8) * 8
        x = torch.from_numpy(np.pad(im, ((0, H - h), (0, W - w), (0, 0)), mode="reflect")).permute(2, 0, 1)[None]
        save_file({"latent": vae.encode(x).latent_dist.mode().contiguous()}, str(lat / (p.name + ".safetensors")))
    for q in sorted(lat.iterdir()):
        y = vae.decode(load_file(str(q))["latent"]).sample[0].clamp(-1, 1)
        Image.fromarray(((y + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(rec / (q.name[:-12] + ".png"))
'''


def bench_e2e(args, reference, ours) -> list[dict]:
    """The CLI at default settings (and bf16) against the plain diffusers loop over the same photographs."""
    import shutil

    from PIL import Image

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = tmp / "photos"
        photos.mkdir()
        import skimage.data

        data_dir = Path(skimage.data.__file__).parent
        names = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "camera.png", "hubble_deep_field.jpg",
                 "retina.jpg", "brick.png", "grass.png", "gravel.png", "clock_motion.png", "cell.png", "text.png",
                 "coins.png", "moon.png", "ihc.png"]
        count = 0
        for name in names:
            path = data_dir / name
            if not path.exists():
                continue
            im = Image.open(path).convert("RGB")
            im.thumbnail((args.e2e_size, args.e2e_size))
            im.save(photos / f"{path.stem}.png")
            count += 1
        model_file = tmp / "sd-vae.safetensors"
        save_native(ours, model_file)
        diffusers_dir = tmp / "sd-vae-diffusers"
        reference.save_pretrained(diffusers_dir)
        env = dict(os.environ)

        def run(cmd: list[str]) -> float:
            start = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return time.perf_counter() - start

        base = run([sys.executable, "-c", DIFFUSERS_LOOP, str(photos), str(diffusers_dir), str(tmp / "dl"), str(tmp / "dr")])
        rows.append({"impl": "diffusers loop", "images": count, "seconds": round(base, 1), "speedup": 1.0})
        # (not --compile: photographs of many sizes each compile anew, which costs more than it saves)
        for dtype in args.dtypes:
            lat, rec = tmp / f"l-{dtype}", tmp / f"r-{dtype}"
            common = ["--model", str(model_file), "--dtype", dtype, "--quiet"]
            seconds = run(["vqcli", "encode", str(photos), "-o", str(lat), *common])
            seconds += run(["vqcli", "decode", str(lat), "-o", str(rec), *common])
            rows.append({"impl": f"vqcli {dtype}", "images": count, "seconds": round(seconds, 1), "speedup": round(base / seconds, 2)})
            shutil.rmtree(lat, ignore_errors=True)
            shutil.rmtree(rec, ignore_errors=True)
        for r in rows:
            print(f"| end to end | {r['images']} photos | {r['impl']:16} | {r['seconds']:7.1f} s | {r['speedup']:.2f}x |", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=2, help="timed repetitions (best is kept)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", action="store_true", help="also vqcli torch.compile'd (the CLI's --compile)")
    parser.add_argument("--e2e", action="store_true", help="also the end-to-end CLI line")
    parser.add_argument("--e2e-size", type=int, default=512, help="longest side of the end-to-end photographs")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from machine import describe, summary  # (benchmarks/machine.py, beside this file)

    machine = describe()
    print(summary(machine))
    print(f"{args.threads} threads")
    peak = machine_peak(args.threads)
    print("machine peak GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in peak.items()), flush=True)
    reference, ours = build_models(args)
    print(HEADER, flush=True)
    rows = bench_models(args, reference, ours)
    e2e = bench_e2e(args, reference, ours) if args.e2e else []
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "peak_gflops": peak, "rows": rows, "end_to_end": e2e}, indent=2))


if __name__ == "__main__":
    main()
