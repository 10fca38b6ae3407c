#!/usr/bin/env bash
# Re-trains the two embedded models with the recipe they were shipped with, on a 2-core CPU,
# the two side by side with one thread each. Training photographs: scikit-image's public-domain /
# CC0 set, minus the validation photographs in sample_images/ (see README, "Embedded models").
#
# The recipe runs in phases, each resuming the checkpoint of the one before, under one cosine
# schedule planned for 3000 steps:
#   1. steps 1-1500: 64x64 crops, 16 a step;
#   2. steps 1501-2600: 128x128 crops, 8 a step;
#   3. steps 2601-3000: 256x256 crops, 2 a step; then writes the EMA weights with the latent scale
#      and shift.
# GroupNorm statistics are taken over the whole image, so a model trained only on small crops
# learns the statistics of small crops and shifts colours on whole photographs; the later phases
# show it ever larger images. Both models are f4 with ch 64 (two channels in every GroupNorm group
# at full resolution; with ch 32, one channel a group, large flat areas lost their colour).
#
# Usage: bash scripts/train_default_models.sh [OUT_DIR]      (default: vqcli/weights)
#        FROM_PHASE=N bash scripts/train_default_models.sh   continues at phase N from the checkpoints in OUT_DIR
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

# Each phase: crop, crops per step, the total steps its cosine schedule is planned for, and the
# step it stops at ("-": that total). Phase 1 starts afresh; later phases resume the checkpoint.
recipe() {
  local name=$1
  shift
  local run=(env OMP_NUM_THREADS=1 vqcli train "${common[@]}" --preset "$name" -o "$out/$name.safetensors")
  local phase=0 crop batch total until
  for spec in "$@"; do
    phase=$((phase + 1))
    read -r crop batch total until <<<"$spec"
    [ "$phase" -lt "$from" ] && continue
    local args=(--crop "$crop" --batch-size "$batch" --steps "$total")
    [ "$until" != "-" ] && args+=(--until "$until")
    [ "$phase" -gt 1 ] && args+=(--resume)
    "${run[@]}" "${args[@]}"
  done
}
recipe default "64 16 3000 1500" "128 8 3000 2600" "256 2 3000 -" > runs/train-default.log 2>&1 &
kl=$!
recipe default-vq "64 16 3000 1500" "128 8 3000 2600" "256 2 3000 -" > runs/train-default-vq.log 2>&1 &
vq=$!
wait $kl
wait $vq
tail -n 2 runs/train-default.log runs/train-default-vq.log
