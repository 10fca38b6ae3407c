#!/usr/bin/env bash
# Re-trains the two embedded models with the recipe they were shipped with, on a 2-core CPU,
# the two side by side with one thread each. Training photographs: scikit-image's public-domain /
# CC0 set, minus the validation photographs in sample_images/ (see README, "Embedded models").
#
# The recipe runs in phases, each resuming the checkpoint of the one before:
#   1. 64x64 crops, 16 a step, cosine schedule planned for 6000 steps, stopped early;
#   2. the same crops, the schedule re-planned for a shorter total;
#   3. 128x128 crops, 8 a step, to the end. Models trained only on small crops learn the
#      statistics of small crops: on whole photographs they shifted colours and framed the
#      border (validation PSNR 18 dB while crops reached 26 dB); larger crops late cure that.
#
# Usage: bash scripts/train_default_models.sh [OUT_DIR]      (default: vqcli/weights)
#        FROM_PHASE=3 bash scripts/train_default_models.sh   continues from the checkpoints in OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-vqcli/weights}
from=${FROM_PHASE:-1}
mkdir -p "$out" runs/train-data
skdata=$(python -c 'import os, skimage.data; print(os.path.dirname(skimage.data.__file__))')
for f in chelsea.png hubble_deep_field.jpg retina.jpg brick.png grass.png gravel.png text.png cell.png clock_motion.png; do
  cp "$skdata/$f" runs/train-data/
done
common=(runs/train-data --val sample_images --seed 0 --checkpoint-every 250 --val-every 500 --overwrite)

# name  phase-1 (total, until)  phase-2 (total, until)  phase-3 total
recipe() {
  local name=$1 p1_total=$2 p1_until=$3 p2_total=$4 p2_until=$5 p3_total=$6
  local run=(env OMP_NUM_THREADS=1 vqcli train "${common[@]}" --preset "$name" -o "$out/$name.safetensors")
  if [ "$from" -le 1 ]; then "${run[@]}" --crop 64 --batch-size 16 --steps "$p1_total" --until "$p1_until"; fi
  if [ "$from" -le 2 ]; then "${run[@]}" --resume --steps "$p2_total" --until "$p2_until"; fi
  "${run[@]}" --resume --crop 128 --batch-size 8 --steps "$p3_total"
}
recipe default 6000 1000 4000 3250 4500 > runs/train-default.log 2>&1 &
kl=$!
recipe default-vq 6000 750 3500 2750 4000 > runs/train-default-vq.log 2>&1 &
vq=$!
wait $kl
wait $vq
tail -n 2 runs/train-default.log runs/train-default-vq.log
