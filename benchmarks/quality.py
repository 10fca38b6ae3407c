"""Reconstruction quality of models beside two floors, per photograph and mean.

    python benchmarks/quality.py [--model default --model default-vq] [--val DATA_DIR/val] [--json]

For each model (an embedded name or a weights file) and each photograph of sample_images/ and of
--val (the validation photographs of scripts/get_training_data.sh, shrunk to 768 px on the long
side with LANCZOS), read as vqcli reads it (its colour profile converted to sRGB) and taken as 8-bit
RGB: PSNR, SSIM, CIEDE2000 (mean colour difference; about 2.3 is just noticeable) and the mean bias
of each channel in 8-bit levels, after a round trip through the CLI's own path (vqcli.pipeline
encode_array / decode_array, float32). Beside them, on the same photographs, in the same run:
  resize: 4x down with Pillow's LANCZOS, back up with BICUBIC (16x fewer values than RGB);
  jpeg:   JPEG (Pillow, 4:2:0, optimised) at the quality whose file is closest to 0.625 bits per
          pixel, the bit rate of default-vq's indices (10 bits per 16 pixels).
Prints a Markdown table per set (means last) on stdout, or with --json everything as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vqcli import metrics  # noqa: E402
from vqcli.checkpoints.load import resolve_model  # noqa: E402
from vqcli.errors import VqcliError  # noqa: E402
from vqcli.io.images import load_image  # noqa: E402
from vqcli.pipeline.decode import decode_array  # noqa: E402
from vqcli.pipeline.encode import encode_array  # noqa: E402

VAL_SIDE = 768
BITS_PER_PIXEL = 0.625
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")


def read_rgb(path: Path, long_side: int | None = None) -> np.ndarray:
    """A photograph as vqcli reads it (colour profile converted to sRGB, float32 in [0, 1]), taken as
    8-bit RGB, optionally shrunk to ``long_side`` with LANCZOS."""
    im = to_pil(load_image(path, max_pixels=None))
    if long_side is not None and max(im.size) > long_side:
        scale = long_side / max(im.size)
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
    return np.asarray(im, dtype=np.float32) / 255.0


def to_pil(rgb: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(rgb, 0.0, 1.0) * 255.0).round().astype(np.uint8))


def resize_floor(rgb: np.ndarray) -> np.ndarray:
    height, width = rgb.shape[:2]
    small = to_pil(rgb).resize((max(1, width // 4), max(1, height // 4)), Image.Resampling.LANCZOS)
    return np.asarray(small.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0


def jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def jpeg_floor(rgb: np.ndarray, bits_per_pixel: float = BITS_PER_PIXEL) -> tuple[np.ndarray, int, float]:
    """JPEG at the quality (1-100) whose size is closest to ``bits_per_pixel``: (decoded, quality,
    bits per pixel reached). File size grows with quality, so a binary search finds the largest
    quality within the budget; it or the next one up is the closest."""
    image = to_pil(rgb)
    budget = bits_per_pixel * image.width * image.height / 8.0
    sizes: dict[int, bytes] = {}

    def size(q: int) -> int:
        if q not in sizes:
            sizes[q] = jpeg_bytes(image, q)
        return len(sizes[q])

    lo, hi = 1, 100
    while lo < hi:  # the largest quality whose size is within the budget (1 if none is)
        mid = (lo + hi + 1) // 2
        if size(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    best = min((q for q in (lo, lo + 1) if q <= 100), key=lambda q: abs(size(q) - budget))
    decoded = np.asarray(Image.open(io.BytesIO(sizes[best])).convert("RGB"), dtype=np.float32) / 255.0
    return decoded, best, 8.0 * size(best) / (image.width * image.height)


def scores(reference: np.ndarray, test: np.ndarray) -> dict:
    r, g, b = metrics.channel_bias(reference, test)
    return {
        "psnr": round(metrics.psnr(reference, test), 3),
        "ssim": round(metrics.ssim(reference, test), 4),
        "ciede2000": round(metrics.ciede2000(reference, test), 3),
        "bias": [round(r, 2), round(g, 2), round(b, 2)],
    }


@torch.inference_mode()
def roundtrip(model, rgb: np.ndarray) -> np.ndarray:
    return decode_array(model, encode_array(model, rgb), rgb.shape[0], rgb.shape[1])


def image_sets(val: Path | None) -> dict[str, dict[str, np.ndarray]]:
    sets = {"sample_images": {p.stem: read_rgb(p) for p in sorted((ROOT / "sample_images").iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}}
    if val is not None:
        if not val.is_dir():
            raise VqcliError(f"{val}: no such folder")
        photos = {p.stem: read_rgb(p, VAL_SIDE) for p in sorted(val.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
        if not photos:
            raise VqcliError(f"{val}: no photographs in it")
        sets["validation"] = photos
    return sets


def mean_row(rows: list[dict]) -> dict:
    return {
        "psnr": round(float(np.mean([r["psnr"] for r in rows])), 3),
        "ssim": round(float(np.mean([r["ssim"] for r in rows])), 4),
        "ciede2000": round(float(np.mean([r["ciede2000"] for r in rows])), 3),
        "bias": [round(float(np.mean([r["bias"][c] for r in rows])), 2) for c in range(3)],
        "max_abs_bias": round(float(max(max(abs(v) for v in r["bias"]) for r in rows)), 2),
    }


def measure(models: list[str], val: Path | None, device: torch.device) -> dict:
    sets = image_sets(val)
    loaded = {name: resolve_model(name, device=device) for name in models}
    result: dict = {"bits_per_pixel": BITS_PER_PIXEL, "device": str(device), "torch": torch.__version__, "sets": {}}
    for set_name, images in sets.items():
        per_image = {}
        for name, rgb in images.items():
            jpeg, quality, bpp = jpeg_floor(rgb)
            row = {"size": [rgb.shape[1], rgb.shape[0]], "resize": scores(rgb, resize_floor(rgb))}
            row["jpeg"] = {**scores(rgb, jpeg), "quality": quality, "bits_per_pixel": round(bpp, 4)}
            for model_name, model in loaded.items():
                started = time.perf_counter()
                row[model_name] = {**scores(rgb, roundtrip(model, rgb)), "seconds": round(time.perf_counter() - started, 3)}
            per_image[name] = row
        columns = ["resize", "jpeg", *loaded]
        means = {c: mean_row([row[c] for row in per_image.values()]) for c in columns}
        result["sets"][set_name] = {"images": per_image, "mean": means}
    return result


def markdown(result: dict) -> str:
    lines = []
    for set_name, data in result["sets"].items():
        columns = list(data["mean"])
        lines += [f"### {set_name}", ""]
        lines.append("| image | " + " | ".join(f"{c} PSNR / SSIM / CIEDE2000 / bias R,G,B" for c in columns) + " |")
        lines.append("|---|" + "---|" * len(columns))

        def cell(v: dict) -> str:
            return f"{v['psnr']:.2f} / {v['ssim']:.3f} / {v['ciede2000']:.2f} / {', '.join(f'{b:+.1f}' for b in v['bias'])}"

        for name, row in data["images"].items():
            lines.append(f"| {name} | " + " | ".join(cell(row[c]) for c in columns) + " |")
        lines.append("| **mean** | " + " | ".join(f"**{cell(data['mean'][c])}** (max bias {data['mean'][c]['max_abs_bias']:.1f})" for c in columns) + " |")
        qualities = [row["jpeg"]["quality"] for row in data["images"].values()]
        bpps = [row["jpeg"]["bits_per_pixel"] for row in data["images"].values()]
        lines += [
            "",
            f"resize: 4x LANCZOS down, BICUBIC up. jpeg: quality {min(qualities)}-{max(qualities)}, "
            f"{min(bpps):.3f}-{max(bpps):.3f} bits per pixel (target {result['bits_per_pixel']}).",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="embedded name or weights file (repeatable; default: default, default-vq)")
    parser.add_argument("--val", type=Path, default=None, help="folder of validation photographs (DATA_DIR/val)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    args = parser.parse_args(argv)
    try:
        result = measure(args.model or ["default", "default-vq"], args.val, torch.device(args.device))
    except VqcliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=1) if args.json else markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
