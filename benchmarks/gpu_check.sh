#!/usr/bin/env bash
# The CUDA path checked in one short run (about 3-4 minutes on one H200): the cuda-marked tests,
# CUDA/CPU parity, a 4096 px decode's peak memory, speed against diffusers, torchrun with NCCL.
# Writes gpu_check.json and gpu_check.md under $OUT (default: runs/gpu_check in the repository).
#
#   benchmarks/gpu_check.sh                 # on the GPU machine, from anywhere
#   benchmarks/gpu_check.sh --dry-run       # everything tiny, on the CPU
#   benchmarks/gpu_check.sh --parts speed   # one part (see benchmarks/gpu_check.py --help)
#
# vqcli runs from this checkout (PYTHONPATH), not from an installed copy. Where diffusers is not
# installed, it is installed from the wheels in .whl/ (then .whl/fallback/, diffusers' own
# dependencies, if the first set does not import) into $VQCLI_SITE, with no network.
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
SITE="${VQCLI_SITE:-${TMPDIR:-/tmp}/vqcli-gpu-check-site}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1  # (nothing here downloads; say so to huggingface_hub too)

has_diffusers() { "$PY" -c "from diffusers import AutoencoderKL" >/dev/null 2>&1; }

# install wheels into $SITE: pip, or where pip is missing or fails, unpacked (a wheel is a zip file)
install() {
    "$PY" -m pip install -q --no-index --no-deps --upgrade --target "$SITE" "$@" >&2 \
        || "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' "$SITE" "$@"
}

if ! has_diffusers; then
    if ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
        echo "installing diffusers from $REPO/.whl into $SITE" >&2
        install "$REPO"/.whl/*.whl
        export PYTHONPATH="$REPO:$SITE${PYTHONPATH#"$REPO"}"
        if ! has_diffusers && ls "$REPO"/.whl/fallback/*.whl >/dev/null 2>&1; then
            echo "diffusers does not import with this machine's packages; adding .whl/fallback" >&2
            install "$REPO"/.whl/fallback/*.whl
        fi
    fi
    has_diffusers || echo "warning: diffusers is not importable: the parts that need it will fail" >&2
fi

exec "$PY" "$REPO/benchmarks/gpu_check.py" "$@"
