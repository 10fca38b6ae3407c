#!/usr/bin/env bash
# Fetches the training and validation photographs of the embedded models into DATA_DIR:
# DATA_DIR/train/, DATA_DIR/val/ and DATA_DIR/manifest.jsonl (file, package, version, SHA-256,
# licence). The six Debian wallpaper packages are downloaded with `apt-get download` (no install,
# no root needed beyond apt's package lists) and unpacked with `dpkg-deb -x` into a temporary folder;
# scikit-image's photographs come from the installed scikit-image. See DATA.md for every file.
#
# A re-run checks the files already there against the manifest and refuses (exit 1, one line) any
# whose SHA-256 differs.
#
# Usage: bash scripts/get_training_data.sh DATA_DIR
#        DEBS=DIR bash scripts/get_training_data.sh DATA_DIR   use the .deb files already in DIR
#        bash scripts/get_training_data.sh --verify DATA_DIR   only check the files against the manifest
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
PACKAGES=(mate-backgrounds ukui-wallpapers gnome-backgrounds plasma-workspace-wallpapers lomiri-wallpapers-20.04 sway-backgrounds)

if [ "${1:-}" = --verify ]; then
  [ $# -eq 2 ] || { echo "usage: $0 --verify DATA_DIR" >&2; exit 2; }
  exec "$python" "$here/training_data.py" verify "$2"
fi
[ $# -eq 1 ] || { echo "usage: $0 DATA_DIR" >&2; exit 2; }
out=$1
mkdir -p "$out"

debs=${DEBS:-}
if [ -z "$debs" ]; then
  debs=$(mktemp -d)
  trap 'rm -rf "$debs"' EXIT
  if ! (cd "$debs" && apt-get download "${PACKAGES[@]}" >"$debs/apt.log" 2>&1); then
    echo "error: apt-get download failed (run apt-get update first?): $(tail -n 1 "$debs/apt.log")" >&2
    exit 1
  fi
fi
"$python" "$here/training_data.py" collect --debs "$debs" --out "$out" --skimage
