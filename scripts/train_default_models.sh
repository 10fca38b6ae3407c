#!/usr/bin/env bash
# Re-trains the two embedded models exactly as shipped, on this 2-core CPU (about 75 minutes
# with both running side by side, one thread each). Training photographs: scikit-image's public
# domain / CC0 set minus the validation photographs in sample_images/ (see README, "Data").
# Usage: bash scripts/train_default_models.sh [OUT_DIR]   (default: vqcli/weights)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-vqcli/weights}
mkdir -p "$out" runs/train-data
skdata=$(python -c 'import os, skimage.data; print(os.path.dirname(skimage.data.__file__))')
for f in chelsea.png hubble_deep_field.jpg retina.jpg brick.png grass.png gravel.png text.png cell.png clock_motion.png; do
  cp "$skdata/$f" runs/train-data/
done
common=(runs/train-data --val sample_images --batch-size 16 --crop 64 --seed 0
        --checkpoint-every 250 --val-every 500 --overwrite)
resume=()
[ "${RESUME:-0}" = 1 ] && resume=(--resume)
OMP_NUM_THREADS=1 vqcli train "${common[@]}" "${resume[@]}" --preset default --steps "${KL_STEPS:-4000}" -o "$out/default.safetensors" \
  > runs/train-default.log 2>&1 &
kl=$!
OMP_NUM_THREADS=1 vqcli train "${common[@]}" "${resume[@]}" --preset default-vq --steps "${VQ_STEPS:-3500}" -o "$out/default-vq.safetensors" \
  > runs/train-default-vq.log 2>&1 &
vq=$!
wait $kl
wait $vq
tail -n 2 runs/train-default.log runs/train-default-vq.log
