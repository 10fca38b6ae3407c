"""Evaluate the candidates trained by scripts/train_gpu.sh and write its report.

    python scripts/gpu_report.py WORK_DIR OUT_DIR [--device cuda] [--eval-size N] [--val DIR]

WORK_DIR holds one folder per candidate (NAME/): its weights (default.safetensors or
default-vq.safetensors), its training summary (summary.json, `vqcli train --json`), log and exit
status (rc). Each model that exists is measured on sample_images/ and on the validation
photographs (--val) in float32 on --device: PSNR, CIEDE2000 and the mean bias of each channel, per
image and mean, beside the 4x LANCZOS/BICUBIC resize floor. The KL candidate with the best mean
PSNR over all those images becomes OUT_DIR/default.safetensors, the other KL candidates
OUT_DIR/candidate-NAME.safetensors, the best VQ one OUT_DIR/default-vq.safetensors; report.json
and report.md say what each reached. A candidate that failed is reported with the end of its log.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vqcli import AutoEncoder, metrics  # noqa: E402
from vqcli.checkpoints.native import load_native  # noqa: E402
from vqcli.io.images import load_image  # noqa: E402
from vqcli.pipeline.decode import decode_array  # noqa: E402
from vqcli.pipeline.encode import encode_array  # noqa: E402


def resize_floor(rgb: np.ndarray) -> np.ndarray:
    """4x down with LANCZOS, back up with BICUBIC: 16x fewer values, the floor a model must beat."""
    h, w = rgb.shape[:2]
    im = Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8))
    small = im.resize((max(1, w // 4), max(1, h // 4)), Image.Resampling.LANCZOS)
    return np.asarray(small.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0


def load_set(folder: Path, size: int | None) -> dict[str, np.ndarray]:
    images = {}
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")):
        rgb = load_image(path)
        if size:  # a centred crop (the CPU dry run measures small images)
            h, w = rgb.shape[:2]
            top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
            rgb = rgb[top : top + size, left : left + size]
        images[path.stem] = rgb
    return images


def scores(reference: np.ndarray, test: np.ndarray) -> dict:
    r, g, b = metrics.channel_bias(reference, test)
    return {
        "psnr": round(metrics.psnr(reference, test), 3),
        "ciede2000": round(metrics.ciede2000(reference, test), 3),
        "bias": [round(r, 2), round(g, 2), round(b, 2)],
    }


@torch.no_grad()
def evaluate(model: AutoEncoder, images: dict[str, np.ndarray]) -> dict:
    per_image, codes = {}, set()
    for name, rgb in images.items():
        latent = encode_array(model, rgb)
        if model.config.kind == "vq":
            codes.update(latent.flatten().tolist())
        per_image[name] = scores(rgb, decode_array(model, latent, rgb.shape[0], rgb.shape[1]))
    result = {"images": per_image, **mean_of(per_image)}
    if model.config.kind == "vq":
        result["codes_used"] = round(len(codes) / model.config.n_embed, 4)
    return result


def mean_of(per_image: dict) -> dict:
    values = list(per_image.values())
    return {
        "mean_psnr": round(float(np.mean([v["psnr"] for v in values])), 3),
        "mean_ciede2000": round(float(np.mean([v["ciede2000"] for v in values])), 3),
        "max_abs_bias": round(float(max(max(abs(c) for c in v["bias"]) for v in values)), 2),
    }


def tail(path: Path, lines: int = 8) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--eval-size", type=int, default=None, help="evaluate centred crops of this side")
    parser.add_argument("--val", type=Path, default=None, help="folder of validation photographs")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sets = {"sample_images": load_set(ROOT / "sample_images", args.eval_size)}
    if args.val is not None and args.val.is_dir():
        sets["validation"] = load_set(args.val, args.eval_size)
    floors = {}
    for set_name, images in sets.items():
        per_image = {name: scores(rgb, resize_floor(rgb)) for name, rgb in images.items()}
        floors[set_name] = {"images": per_image, **mean_of(per_image)}

    candidates = {}
    for folder in sorted(p for p in args.work.iterdir() if p.is_dir()):
        entry: dict = {"name": folder.name}
        rc = (folder / "rc").read_text().strip() if (folder / "rc").exists() else "missing"
        entry["exit_status"] = rc
        summary = folder / "summary.json"
        if summary.exists():
            try:
                entry["training"] = json.loads(summary.read_text())
            except ValueError:
                entry["training"] = None
        weights = sorted(folder.glob("*.safetensors"))
        if rc != "0" or not weights:
            entry["failed"] = True
            entry["log_tail"] = tail(folder / "log")
            candidates[folder.name] = entry
            continue
        try:
            model = load_native(weights[0])
        except Exception as e:  # noqa: BLE001 - one broken candidate must not hide the others
            entry["failed"] = True
            entry["log_tail"] = f"its weights do not load: {type(e).__name__}: {e}"
            candidates[folder.name] = entry
            continue
        entry["file"] = str(weights[0])
        entry["kind"] = model.config.kind
        entry["megabytes"] = round(weights[0].stat().st_size / 1e6, 2)
        entry["parameters"] = sum(p.numel() for p in model.parameters())
        # Measured on the device; should that fail, on the CPU; should that fail too, the weights
        # still come back, unranked, with the error in the report.
        for where in dict.fromkeys([device, torch.device("cpu")]):
            try:
                started = time.perf_counter()
                entry["eval"] = {set_name: evaluate(model.to(where), images) for set_name, images in sets.items()}
                entry["eval_device"] = str(where)
                entry["eval_seconds"] = round(time.perf_counter() - started, 2)
                break
            except Exception as e:  # noqa: BLE001
                entry.setdefault("eval_errors", []).append(f"{where}: {type(e).__name__}: {e}")
        model.cpu()
        candidates[folder.name] = entry

    def overall(entry: dict) -> float:
        evals = entry.get("eval", {})
        psnrs = [v["psnr"] for s in evals.values() for v in s["images"].values()]
        return float(np.mean(psnrs)) if psnrs else -math.inf

    args.out.mkdir(parents=True, exist_ok=True)
    chosen = {}
    for kind, target in (("kl", "default"), ("vq", "default-vq")):
        ranked = sorted((c for c in candidates.values() if c.get("kind") == kind and not c.get("failed")), key=overall, reverse=True)
        for rank, c in enumerate(ranked):
            name = f"{target}.safetensors" if rank == 0 else f"candidate-{c['name']}.safetensors"
            if kind == "vq" and rank > 0:
                continue  # one VQ file is enough to bring back
            shutil.copyfile(c["file"], args.out / name)
            c["returned_as"] = name
            if rank == 0:
                chosen[target] = c["name"]

    report = {"device": str(device), "chosen": chosen, "floors": floors, "candidates": candidates}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "report.md").write_text(markdown(report))
    sys.stdout.write(markdown(report))
    return 0 if chosen else 1


def markdown(report: dict) -> str:
    lines = [f"# GPU training report ({report.get('gpu', report['device'])})", ""]
    lines.append("Chosen: " + (", ".join(f"`{k}` = {v}" for k, v in report["chosen"].items()) or "nothing (every candidate failed)"))
    lines.append("")
    set_names = list(report["floors"])
    head = "| candidate | kind | steps | train s | " + " | ".join(f"{s} PSNR / CIEDE2000 / max bias" for s in set_names) + " | codes used |"
    lines += [head, "|" + "---|" * (5 + len(set_names))]
    floor_cells = " | ".join(
        f"{report['floors'][s]['mean_psnr']:.2f} / {report['floors'][s]['mean_ciede2000']:.2f} / {report['floors'][s]['max_abs_bias']:.1f}"
        for s in set_names
    )
    lines.append(f"| resize floor (4x LANCZOS/BICUBIC) | - | - | - | {floor_cells} | - |")
    for c in report["candidates"].values():
        training = c.get("training") or {}
        if c.get("failed"):
            lines.append(f"| {c['name']} | FAILED (exit {c['exit_status']}) | {training.get('steps', '-')} | - | " + " | ".join("-" for _ in set_names) + " | - |")
            continue
        if "eval" not in c:
            lines.append(f"| {c['name']} | {c['kind']} | {training.get('steps', '?')} | {training.get('seconds', '?')} | "
                         + " | ".join("not measured" for _ in set_names) + " | - |")
            continue
        cells = " | ".join(
            f"{c['eval'][s]['mean_psnr']:.2f} / {c['eval'][s]['mean_ciede2000']:.2f} / {c['eval'][s]['max_abs_bias']:.1f}"
            for s in set_names
        )
        codes = c["eval"][set_names[0]].get("codes_used")
        codes_text = "-" if codes is None else f"{100 * codes:.0f}% (sample images)"
        lines.append(
            f"| {c['name']} | {c['kind']} | {training.get('steps', '?')} | {training.get('seconds', '?')} | {cells} | {codes_text} |"
        )
    for c in report["candidates"].values():
        if c.get("failed"):
            lines += ["", f"`{c['name']}` failed; the end of its log:", "", "```", c.get("log_tail", ""), "```"]
    for c in report["candidates"].values():
        if c.get("eval_errors"):
            lines += ["", f"`{c['name']}`: evaluation errors: " + "; ".join(c["eval_errors"])]
    for c in report["candidates"].values():
        if c.get("failed") or "eval" not in c:
            continue
        for s in set_names:
            lines += ["", f"### {c['name']} on {s}", "", "| image | PSNR | resize floor | CIEDE2000 | bias R, G, B |", "|---|---|---|---|---|"]
            for name, v in c["eval"][s]["images"].items():
                floor = report["floors"][s]["images"][name]["psnr"]
                lines.append(f"| {name} | {v['psnr']:.2f} | {floor:.2f} | {v['ciede2000']:.2f} | {', '.join(f'{b:+.1f}' for b in v['bias'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
