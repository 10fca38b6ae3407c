#!/usr/bin/env bash
# Re-trains the embedded models with the recipes they were shipped with, on a 2-core CPU, one after
# the other with both threads each (or two runs side by side, OMP_NUM_THREADS=1 each). Training
# photographs of phases 1 to 3: scikit-image's public-domain / CC0 set, minus the validation
# photographs in sample_images/ (see README, "Embedded models").
#
# Each recipe runs in phases, each resuming the checkpoint of the one before, under one cosine
# schedule planned for all its steps; the last phase writes the EMA weights with the latent scale
# and shift:
#   default (KL, no middle attention), before its fine-tune: 5200 steps, 94 minutes alone here,
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
# With DATA=DIR (made by scripts/get_training_data.sh) each model is then fine-tuned on DIR/train:
# the Debian wallpaper packages' images (see DATA.md), each shrunk to 1024 px on its long side when
# read. Phase 4 starts from the weights phase 3 wrote (`vqcli train --init`, the KL latent scale and
# shift kept): 192x192 crops, 2 a step, peak learning rate 1e-4 after 50 warm-up steps, cosine over
# 3500 steps for default (61 minutes here, one thread, beside the other: 27.16 -> 28.26 dB; 31.5
# minutes alone on both threads since training on an AMX CPU runs channels-last) and 2400 for
# default-vq (49 minutes beside default: 22.16 -> 25.40 dB). The shipped weights are these fine-tunes
# (docs/models.md); validation stays sample_images/. FROM_PHASE=4 fine-tunes the weights already in
# OUT_DIR (in vqcli/weights: the shipped ones, so run it on a copy) without the earlier phases.
# Usage: bash scripts/train_default_models.sh [OUT_DIR] [MODEL...]   (default: vqcli/weights, both)
#        DATA=DIR bash scripts/train_default_models.sh OUT [MODEL...]  then fine-tuned on the wider data
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
fi
mkdir -p runs/train-data
skdata=$(python -c 'import os, skimage.data; print(os.path.dirname(skimage.data.__file__))')
for f in chelsea.png hubble_deep_field.jpg retina.jpg brick.png grass.png gravel.png text.png cell.png clock_motion.png; do
  cp "$skdata/$f" runs/train-data/
done
common=(--val sample_images --seed 0 --checkpoint-every 250 --val-every 500 --overwrite)

# Each phase: crop, crops per step, the total steps its cosine schedule is planned for, and the
# step it stops at ("-": that total). Phase 1 starts afresh; later phases resume the checkpoint.
# Phase 4, with DATA only, fine-tunes the result for the number of steps it names.
recipe() {
  local name=$1 fine_tune=$2
  shift 2
  local model=$out/$name.safetensors
  local phase=0 crop batch total until
  for spec in "$@"; do
    phase=$((phase + 1))
    read -r crop batch total until <<<"$spec"
    [ "$phase" -lt "$from" ] && continue
    local args=(--crop "$crop" --batch-size "$batch" --steps "$total")
    [ "$until" != "-" ] && args+=(--until "$until")
    [ "$phase" -gt 1 ] && args+=(--resume)
    vqcli train runs/train-data "${common[@]}" --preset "$name" -o "$model" "${args[@]}"
  done
  if [ -n "${DATA:-}" ]; then
    vqcli train "$DATA/train" --max-side 1024 "${common[@]}" --init "$model" -o "$model" \
      --crop 192 --batch-size 2 --lr 1e-4 --warmup 50 --steps "$fine_tune"
  fi
}
for name in "${models[@]}"; do
  case $name in
    default)
      if [ "${QUICK:-0}" = 1 ]; then
        recipe default 3500 "64 16 4000 2000" "128 8 4000 3500" "256 2 4000 -"
      else
        recipe default 3500 "64 16 5200 2600" "128 8 5200 4500" "256 2 5200 -"
      fi > runs/train-default.log 2>&1 ;;
    default-vq) recipe default-vq 2400 "64 16 3000 1500" "128 8 3000 2600" "256 2 3000 -" > runs/train-default-vq.log 2>&1 ;;
    *) echo "unknown model $name (default or default-vq)" >&2; exit 2 ;;
  esac
  tail -n 2 "runs/train-$name.log"
done
