"""Collect the training and validation photographs of the embedded models from Debian wallpaper
packages and scikit-image, with a manifest of where each file came from.

Called by ``scripts/get_training_data.sh``; usable alone:

    python scripts/training_data.py collect --debs DIR_WITH_DEBS --out DATA_DIR [--skimage]
    python scripts/training_data.py verify DATA_DIR
    python scripts/training_data.py data-md DATA_DIR > DATA.md

Files are copied byte for byte (their SHA-256 is that of the file in the package). A re-run
checks every file already in DATA_DIR against the manifest and refuses, with one line and exit
status 1, a file whose hash differs; a file that a package now ships with a different hash is
refused the same way.

Which files: raster images (JPEG, PNG, WebP) at least 512 px on their short side, not the
packages' preview screenshots, not symbolic links (Plasma links one picture under a dozen screen
sizes), not images that are mostly transparent (overlays meant for a coloured desktop), and of
one artwork shipped at several sizes (``Name_3840x2160.jpg``, Plasma's ``images/WxH.png``) only
the largest. SVG is skipped.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
MIN_SIDE = 512
MIN_OPAQUE = 0.99  # mean alpha below this: a transparent overlay, not a picture

# Real photographs held out for validation: skies and landscapes, colourful objects, greens,
# sunsets; none of them is trained on. Keys are "package/name" as in the manifest.
VALIDATION = {
    "mate-backgrounds/Dune",
    "mate-backgrounds/Storm",
    "mate-backgrounds/LadyBird",
    "mate-backgrounds/YellowFlower",
    "mate-backgrounds/FreshFlower",
    "mate-backgrounds/RainDrops",
    "plasma-workspace-wallpapers/Kite",
    "plasma-workspace-wallpapers/EveningGlow",
    "plasma-workspace-wallpapers/summer_1am",
    "plasma-workspace-wallpapers/ColorfulCups",
    "plasma-workspace-wallpapers/Path",
    "lomiri-wallpapers-20.04/Kleiber_by_Lukas_Baubkus",
}

# The photographs among the packages' files (the rest is artwork: renders, gradients, patterns).
PHOTOGRAPHS = VALIDATION | {
    "mate-backgrounds/Aqua",
    "mate-backgrounds/Blinds",
    "mate-backgrounds/Garden",
    "mate-backgrounds/GreenMeadow",
    "mate-backgrounds/TwoWings",
    "mate-backgrounds/Wood",
    "plasma-workspace-wallpapers/BytheWater",
    "plasma-workspace-wallpapers/ColdRipple",
    "plasma-workspace-wallpapers/FallenLeaf",
    "plasma-workspace-wallpapers/Grey",
    "plasma-workspace-wallpapers/OneStandsOut",
    "plasma-workspace-wallpapers/Volna",
}

# scikit-image's photographs (not its synthetic test patterns, and not astronaut, camera, coffee
# and rocket, which are sample_images/, validation only), with the licence its docstrings state.
# moon, page and the motorcycle pair state no licence and are left out.
SKIMAGE = {
    "chelsea.png": ("Stefan van der Walt", "CC0-1.0"),
    "coins.png": ("Brooklyn Museum Collection", "no known copyright restrictions"),
    "hubble_deep_field.jpg": ("NASA", "public domain"),
    "ihc.png": ("Center for Microscopy And Molecular Imaging (CMMI)", "no known copyright restrictions"),
    "retina.jpg": ("Wikimedia Commons, Fundus_photograph_of_normal_left_eye.jpg", "CC0-1.0"),
    "brick.png": ("CC0Textures", "CC0-1.0"),
    "grass.png": ("linolafett (DeviantArt)", "CC0-1.0"),
    "gravel.png": ("CC0Textures", "CC0-1.0"),
    "text.png": ("scikit-image", "public domain"),
    "cell.png": ("scikit-image", "CC0-1.0"),
    "clock_motion.png": ("Stefan van der Walt", "public domain"),
    "microaneurysms.png": ("Andreas Maier", "CC0-1.0"),
}

LICENCE_NAMES = {  # free-form licence sentences (gnome-backgrounds) to SPDX-like names
    "Creative Commons Attribution-ShareAlike 3.0": "CC-BY-SA-3.0",
    "Creative Commons Attribution-ShareAlike 2.0": "CC-BY-SA-2.0",
    "Creative Commons Attribution 2.0": "CC-BY-2.0",
}


class DataError(Exception):
    """A one-line message for the user."""


@dataclass
class Entry:
    file: str  # relative to DATA_DIR
    split: str  # train or val
    package: str
    version: str
    source: str  # path inside the package
    sha256: str
    licence: str
    copyright: str
    photograph: bool
    width: int
    height: int


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- licences -------------------------------------------------------------------------------
def parse_dep5(text: str) -> list[tuple[list[str], str, str]]:
    """(patterns, copyright, licence) of each Files stanza of a machine-readable copyright file."""
    stanzas = []
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                key = key.strip()
                fields[key] = value.strip()
        if "Files" in fields:
            patterns = fields["Files"].split()
            licence = fields.get("License", "").splitlines()[0].strip() if fields.get("License") else ""
            holders = "; ".join(line.strip().rstrip("´") for line in fields.get("Copyright", "").splitlines() if line.strip())
            stanzas.append((patterns, holders, licence))
    return stanzas


def parse_image_authors(text: str) -> list[tuple[list[str], str, str]]:
    """gnome-backgrounds' free-form list: ' - pattern:' lines, then Copyright and 'Licensed under' lines."""
    entries, patterns, holders = [], [], []
    for line in text.splitlines():
        item = re.match(r"\s*-\s+(\S+?):?\s*$", line)
        if item:
            if holders:  # a new list after a finished one
                patterns, holders = [], []
            patterns.append(item.group(1))
            continue
        held = re.match(r"\s*Copyright ©\s*(.+)", line)
        if held and patterns:
            holders.append(held.group(1).strip())
            continue
        licensed = re.match(r"\s*Licensed under (.+?)( License)?\.?\s*$", line)
        if licensed and patterns:
            name = LICENCE_NAMES.get(licensed.group(1).strip(), licensed.group(1).strip())
            entries.append((patterns, "; ".join(holders), name))
            patterns, holders = [], []
    return entries


def licence_for(copyright_text: str, source: str, package: str) -> tuple[str, str]:
    """(licence, copyright holders) of ``source`` (a path inside the package)."""
    parts = Path(source).parts
    tails = ["/".join(parts[i:]) for i in range(len(parts))]

    def matches(pattern: str) -> bool:
        if any(fnmatch.fnmatchcase(t, pattern) for t in tails):
            return True
        # A source-tree path ("20.04/Name.jpg") installed elsewhere: a file named exactly so.
        base = pattern.rsplit("/", 1)[-1]
        return "/" in pattern and not any(c in base for c in "*?[") and base == parts[-1]

    if re.search(r"^Format:", copyright_text[:400], re.MULTILINE):
        found = ("", "")
        for patterns, holders, licence in parse_dep5(copyright_text):
            if any(matches(p) for p in patterns):  # DEP-5: the last matching stanza wins
                found = (licence, holders)
        if found[0]:
            return found
    else:
        for patterns, holders, licence in parse_image_authors(copyright_text):
            if any(matches(p) or matches(p + "*") for p in patterns):
                return licence, holders
        flat = " ".join(copyright_text.split())
        if "GNU General Public License" in flat and "version 2" in flat:
            return "GPL-2+ (the package's licence; file not listed separately)", f"{package} upstream authors"
    raise DataError(f"{package}: {source}: no licence found in the package's copyright file")


# --- selection ------------------------------------------------------------------------------
def artwork_key(package: str, rel: Path) -> tuple[str, str]:
    """(group, name): files of one group are one artwork at several sizes; the largest is kept."""
    parts = rel.parts
    if "contents" in parts:  # Plasma: wallpapers/NAME/contents/images[_dark]/WxH.ext
        i = parts.index("contents")
        name = parts[i - 1] + ("-dark" if parts[i + 1].endswith("_dark") else "")
        return f"{package}/{name}", name
    stem = re.sub(r"_\d+x\d+(_Portrait)?$", "", rel.stem)
    return f"{package}/{stem}", stem


def image_info(path: Path) -> tuple[int, int, float]:
    from PIL import Image

    with Image.open(path) as im:
        width, height = im.size
        opaque = 1.0
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im.draft(None, (512, 512))
            alpha = im.convert("RGBA").getchannel("A").resize((256, 256))
            opaque = float(np.asarray(alpha, dtype=np.float64).mean() / 255.0)
    return width, height, opaque


def candidates(package: str, root: Path) -> dict[str, tuple[str, Path]]:
    """group -> (name, path) of the images of one extracted package."""
    best: dict[str, tuple[str, Path, int]] = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem == "screenshot" or "/doc/" in path.as_posix():
            continue
        rel = path.relative_to(root)
        width, height, opaque = image_info(path)
        if min(width, height) < MIN_SIDE or opaque < MIN_OPAQUE:
            continue
        group, name = artwork_key(package, rel)
        if group not in best or width * height > best[group][2]:
            best[group] = (name, path, width * height)
    return {g: (n, p) for g, (n, p, _) in best.items()}


# --- manifest -------------------------------------------------------------------------------
def read_manifest(out: Path) -> dict[str, Entry]:
    path = out / "manifest.jsonl"
    if not path.exists():
        return {}
    entries = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            entry = Entry(**json.loads(line))
        except (ValueError, TypeError):
            raise DataError(f"{path}: line {n} is not a manifest entry") from None
        entries[entry.file] = entry
    return entries


def verify(out: Path) -> int:
    """Check every file of the manifest; raise DataError at the first that differs or is missing."""
    entries = read_manifest(out)
    if not entries:
        raise DataError(f"{out / 'manifest.jsonl'}: no manifest")
    for entry in entries.values():
        path = out / entry.file
        if not path.exists():
            raise DataError(f"{path}: listed in the manifest but missing")
        found = sha256(path)
        if found != entry.sha256:
            raise DataError(f"{path}: SHA-256 {found[:12]}... differs from the manifest's {entry.sha256[:12]}...; refusing it")
    return len(entries)


def place(source: Path, out: Path, entry: Entry, known: dict[str, Entry]) -> None:
    """Copy ``source`` to its place, or check the copy already there, against the manifest."""
    target = out / entry.file
    previous = known.get(entry.file)
    if previous is not None and previous.sha256 != entry.sha256:
        raise DataError(
            f"{source}: SHA-256 {entry.sha256[:12]}... differs from the manifest's {previous.sha256[:12]}... for {target}; refusing it"
        )
    if target.exists():
        found = sha256(target)
        if found != entry.sha256:
            raise DataError(f"{target}: SHA-256 {found[:12]}... differs from the manifest's {entry.sha256[:12]}...; refusing it")
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(".partial-" + target.name)
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def deb_field(deb: Path, field: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), field], check=True, capture_output=True, text=True).stdout.strip()


def collect(debs: Path, out: Path, with_skimage: bool) -> list[Entry]:
    known = read_manifest(out)
    entries: list[Entry] = []
    deb_files = sorted(debs.glob("*.deb"))
    if not deb_files:
        raise DataError(f"{debs}: no .deb files")
    with tempfile.TemporaryDirectory(prefix="vqcli-debs-") as tmp:
        for deb in deb_files:
            package, version = deb_field(deb, "Package"), deb_field(deb, "Version")
            root = Path(tmp) / package
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
            copyright_file = root / "usr/share/doc" / package / "copyright"
            if not copyright_file.exists():
                raise DataError(f"{deb}: has no /usr/share/doc/{package}/copyright")
            copyright_text = copyright_file.read_text(errors="replace")
            for group, (name, path) in sorted(candidates(package, root).items()):
                rel = path.relative_to(root)
                licence, holders = licence_for(copyright_text, rel.as_posix(), package)
                split = "val" if group in VALIDATION else "train"
                width, height, _ = image_info(path)
                entry = Entry(
                    file=f"{split}/{package}__{name}{path.suffix.lower()}",
                    split=split,
                    package=package,
                    version=version,
                    source="/" + rel.as_posix(),
                    sha256=sha256(path),
                    licence=licence,
                    copyright=holders,
                    photograph=group in PHOTOGRAPHS,
                    width=width,
                    height=height,
                )
                place(path, out, entry, known)
                entries.append(entry)
    if with_skimage:
        import skimage
        import skimage.data

        skdir = Path(skimage.data.__file__).parent
        for name, (author, licence) in SKIMAGE.items():
            path = skdir / name
            if not path.exists():
                raise DataError(f"{path}: not in this scikit-image ({skimage.__version__})")
            width, height, _ = image_info(path)
            entry = Entry(
                file=f"train/skimage__{name}",
                split="train",
                package="scikit-image",
                version=skimage.__version__,
                source=f"skimage/data/{name}",
                sha256=sha256(path),
                licence=licence,
                copyright=author,
                photograph=True,
                width=width,
                height=height,
            )
            place(path, out, entry, known)
            entries.append(entry)
    missing = sorted(set(known) - {e.file for e in entries})
    if missing:
        raise DataError(f"{out / missing[0]}: in the manifest but no longer in the packages ({len(missing)} such files)")
    tmp_manifest = out / ".manifest.jsonl.partial"
    tmp_manifest.write_text("".join(json.dumps(asdict(e), ensure_ascii=False) + "\n" for e in entries))
    os.replace(tmp_manifest, out / "manifest.jsonl")
    return entries


def data_md(out: Path) -> str:
    """DATA.md: every file with its package, author and licence."""
    entries = sorted(read_manifest(out).values(), key=lambda e: (e.split != "val", e.package, e.file))
    if not entries:
        raise DataError(f"{out / 'manifest.jsonl'}: no manifest")
    versions = sorted({(e.package, e.version) for e in entries})
    lines = [
        "# Training and validation data of the embedded models",
        "",
        "Made on any machine by `bash scripts/get_training_data.sh DATA_DIR` (needs `apt-get` with Debian's",
        "package lists, `dpkg-deb` and scikit-image); not committed. The script copies each file byte for byte",
        "and writes `DATA_DIR/manifest.jsonl` (file, package, version, path in the package, SHA-256, licence,",
        "copyright holders); a re-run refuses any file whose hash differs from the manifest. Authors and",
        "licences below are those of each package's `/usr/share/doc/PACKAGE/copyright` (scikit-image: its",
        "`skimage.data` docstrings). This file is written by `python scripts/training_data.py data-md DATA_DIR`.",
        "",
        "For a GPU machine (no network, the repo copied with a 64 MiB limit): `python scripts/pack_gpu_data.py",
        "DATA_DIR .gpu_data` shrinks the training images to 1024 px (JPEG 95) and the validation photographs to",
        "768 px, about 17 MB; `bash scripts/train_gpu.sh OUT_DIR` trains on it there.",
        "",
        "Packages: " + ", ".join(f"`{p}` {v}" for p, v in versions) + ".",
        "",
        "Selection: raster images at least 512 px on the short side; not the preview screenshots, not",
        "symbolic links, not mostly transparent overlays; of one artwork at several sizes only the largest.",
        "`sample_images/` (astronaut, camera, coffee, rocket) is validation only and never trained on.",
        "",
        f"{sum(e.split == 'train' for e in entries)} training files "
        f"({sum(e.split == 'train' and e.photograph for e in entries)} photographs), "
        f"{sum(e.split == 'val' for e in entries)} validation photographs.",
        "",
        "Held out for validation (never trained on): "
        + ", ".join(f"`{Path(e.file).stem.split('__', 1)[1]}` ({e.package})" for e in entries if e.split == "val")
        + ". Chosen as real photographs of varied colour: skies and landscapes (Dune, Storm, Kite, EveningGlow,"
        " summer_1am), colourful objects (LadyBird, YellowFlower, FreshFlower, ColorfulCups), greens (RainDrops,"
        " Path) and a close-up with a blurred background (Kleiber).",
        "",
        "| file | split | photograph | package | size | author (copyright) | licence |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        holders = e.copyright.replace("|", "/")
        holders = re.sub(r"\s*<[^>]*@[^>]*>", "", holders)  # no e-mail addresses in the table
        lines.append(
            f"| `{e.file}` | {e.split} | {'yes' if e.photograph else 'no'} | {e.package} | {e.width}x{e.height} | {holders} | {e.licence} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="extract the images of the .deb files in --debs into --out")
    c.add_argument("--debs", type=Path, required=True)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--skimage", action="store_true", help="add scikit-image's photographs")
    v = sub.add_parser("verify", help="check DATA_DIR's files against its manifest")
    v.add_argument("out", type=Path)
    m = sub.add_parser("data-md", help="print DATA.md for DATA_DIR's manifest")
    m.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "collect":
            entries = collect(args.debs, args.out, args.skimage)
            n_val = sum(e.split == "val" for e in entries)
            print(f"{args.out}: {len(entries) - n_val} training and {n_val} validation files, manifest.jsonl written", file=sys.stderr)
        elif args.command == "verify":
            n = verify(args.out)
            print(f"{args.out}: {n} files match manifest.jsonl", file=sys.stderr)
        else:
            sys.stdout.write(data_md(args.out))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
