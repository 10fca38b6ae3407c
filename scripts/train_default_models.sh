#!/usr/bin/env bash
# Re-trains the embedded models with the recipes they were shipped with, on a 2-core CPU, one after
# the other with both threads each. Training photographs: scikit-image's public-domain / CC0 set,
# minus the validation photographs in sample_images/ (see README, "Embedded models").
#
# Each recipe runs in phases, each resuming the checkpoint of the one before, under one cosine
# schedule planned for all its steps; the last phase writes the EMA weights with the latent scale
# and shift:
#   default (KL, no middle attention), the shipped weights: 5200 steps, 94 minutes alone here,
#     27.37 dB (past 26 dB at step 2500): 64x64 crops, 16 a step, to step 2600; 128x128 crops, 8 a
#     step, to 4500; 256x256 crops, 2 a step.
#   default with QUICK=1: the same phases shortened to 4000 steps (to steps 2000, 3500 and 4000):
#     79 minutes alone here, 26.72 dB; the recipe that stays inside 90 minutes.
#   default-vq, 3000 steps: the same crops, to steps 1500, 2600 and 3000.
# GroupNorm statistics are taken over the whole image, so a model trained only on small crops
# learns the statistics of small crops and shifts colours on whole photographs; the later phases
# show it ever larger images. Both models are f4 with ch 64 (two channels in every GroupNorm group
# at full resolution; with ch 32, one channel a group, large flat areas lost their colour).
#
# With DATA=DIR the recipes train instead on DIR/train, made by scripts/get_training_data.sh (the
# Debian wallpaper packages' images and scikit-image's photographs, see DATA.md), each image shrunk
# to 1024 px on its long side when read; validation stays sample_images/.
#
# Usage: bash scripts/train_default_models.sh [OUT_DIR] [MODEL...]   (default: vqcli/weights, both)
#        DATA=DIR bash scripts/train_default_models.sh OUT [MODEL...]  on the wider training data
#        FROM_PHASE=N bash scripts/train_default_models.sh OUT MODEL   continues MODEL at phase N
#        QUICK=1 bash scripts/train_default_models.sh OUT default      the 79-minute default
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-vqcli/weights}
shift || true
models=("$@")
[ ${#models[@]} -eq 0 ] && models=(default default-vq)
from=${FROM_PHASE:-1}
mkdir -p "$out"
if [ -n "${DATA:-}" ]; then
  [ -d "$DATA/train" ] || { echo "error: $DATA/train: no such folder (make it with scripts/get_training_data.sh)" >&2; exit 1; }
  common=("$DATA/train" --max-side 1024)
else
  mkdir -p runs/train-data
  skdata=$(python -c 'import os, skimage.data; print(os.path.dirname(skimage.data.__file__))')
  for f in chelsea.png hubble_deep_field.jpg retina.jpg brick.png grass.png gravel.png text.png cell.png clock_motion.png; do
    cp "$skdata/$f" runs/train-data/
  done
  common=(runs/train-data)
fi
common+=(--val sample_images --seed 0 --checkpoint-every 250 --val-every 500 --overwrite)

# Each phase: crop, crops per step, the total steps its cosine schedule is planned for, and the
# step it stops at ("-": that total). Phase 1 starts afresh; later phases resume the checkpoint.
recipe() {
  local name=$1
  shift
  local run=(vqcli train "${common[@]}" --preset "$name" -o "$out/$name.safetensors")
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
for name in "${models[@]}"; do
  case $name in
    default)
      if [ "${QUICK:-0}" = 1 ]; then
        recipe default "64 16 4000 2000" "128 8 4000 3500" "256 2 4000 -"
      else
        recipe default "64 16 5200 2600" "128 8 5200 4500" "256 2 5200 -"
      fi > runs/train-default.log 2>&1 ;;
    default-vq) recipe default-vq "64 16 3000 1500" "128 8 3000 2600" "256 2 3000 -" > runs/train-default-vq.log 2>&1 ;;
    *) echo "unknown model $name (default or default-vq)" >&2; exit 2 ;;
  esac
  tail -n 2 "runs/train-$name.log"
done
