"""Pack DATA_DIR (made by scripts/get_training_data.sh) into a small folder that travels with the
repository to a GPU machine (whose copy of the repo is limited to 64 MiB and which has no network).

    python scripts/pack_gpu_data.py DATA_DIR [OUT_DIR=.gpu_data] [--max-mb 25]

OUT_DIR/train: every training image shrunk to at most 1024 px on its long side (Lanczos), as JPEG
(quality 95, lowered in steps of 3 down to 80 until the folder fits in --max-mb; greyscale images
stay single-channel). OUT_DIR/val: the validation photographs at 768 px on the long side, JPEG 95.
OUT_DIR/sources.json names each file's source and its SHA-256 in DATA_DIR's manifest. The input is
checked against the manifest first: a file whose hash differs is refused (exit 1, one line).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training_data import DataError, read_manifest, verify  # noqa: E402

TRAIN_SIDE = 1024
VAL_SIDE = 768


def shrunk(path: Path, side: int) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "PA", "P"):
            im = im.convert("RGBA")
            flat = Image.new("RGBA", im.size, (255, 255, 255, 255))  # as vqcli reads transparency
            im = Image.alpha_composite(flat, im)
        rgb = im.convert("RGB")
    scale = side / max(rgb.size)
    if scale < 1:
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.Resampling.LANCZOS)
    a = np.asarray(rgb)
    if np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2]):
        return rgb.convert("L")
    return rgb


def jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2, optimize=True)
    return buf.getvalue()


def pack(data: Path, out: Path, max_mb: float) -> dict:
    verify(data)
    entries = sorted(read_manifest(data).values(), key=lambda e: e.file)
    train = [(e, shrunk(data / e.file, TRAIN_SIDE)) for e in entries if e.split == "train"]
    val = [(e, shrunk(data / e.file, VAL_SIDE)) for e in entries if e.split == "val"]
    val_bytes = [jpeg(im, 95) for _, im in val]
    quality = 95
    while True:
        train_bytes = [jpeg(im, quality) for _, im in train]
        total = sum(map(len, train_bytes)) + sum(map(len, val_bytes))
        if total <= max_mb * 1e6 or quality <= 80:
            break
        quality -= 3
    if total > max_mb * 1e6:
        raise DataError(f"{out}: {total / 1e6:.1f} MB even at JPEG quality {quality}, over --max-mb {max_mb:g}")
    if out.exists():
        shutil.rmtree(out)
    sources = {}
    for split, items, blobs in (("train", train, train_bytes), ("val", val, val_bytes)):
        (out / split).mkdir(parents=True)
        for (entry, image), blob in zip(items, blobs):
            name = f"{split}/{Path(entry.file).stem}.jpg"
            (out / name).write_bytes(blob)
            sources[name] = {"source": entry.file, "sha256": entry.sha256, "size": list(image.size)}
    (out / "sources.json").write_text(json.dumps({"train_quality": quality, "files": sources}, indent=1) + "\n")
    return {"train": len(train), "val": len(val), "megabytes": round(total / 1e6, 2), "quality": quality}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("out", type=Path, nargs="?", default=Path(".gpu_data"))
    parser.add_argument("--max-mb", type=float, default=25.0)
    args = parser.parse_args(argv)
    try:
        summary = pack(args.data, args.out, args.max_mb)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"{args.out}: {summary['train']} training images (JPEG {summary['quality']}) and {summary['val']} validation "
        f"photographs, {summary['megabytes']} MB",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
