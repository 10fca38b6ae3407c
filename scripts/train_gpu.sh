#!/usr/bin/env bash
# Trains the candidates for the embedded models concurrently on one GPU for a fixed wall-clock
# budget, evaluates them, and writes into OUT_DIR at most six files: default.safetensors (the best
# KL candidate), candidate-NAME.safetensors (the other KL ones), default-vq.safetensors,
# report.json, report.md and log.
#
# The GPU machine receives the repo as a copy and has no network: first, here,
#   bash scripts/get_training_data.sh DATA_DIR && python scripts/pack_gpu_data.py DATA_DIR .gpu_data
# (17 MB), then there, from the repo's root (vqcli need not be installed; python3 has torch):
#   bash scripts/train_gpu.sh "$OUT"
#
# Candidates (all trained on random 256x256 crops, bf16 autocast, time-based cosine schedule):
#   kl-f4:  `default` as shipped: KL f4, 4 latent channels, ch 64, ch_mult 1,1,2 (12x compression)
#   kl-f8:  KL f8, 16 latent channels, ch 64, ch_mult 1,1,2,2 (12x compression, as SD3 and FLUX)
#   vq-f4:  `default-vq` as shipped: VQ f4, 1024 codes of dimension 4
# Environment: MINUTES (training budget of each, default 3.5), DATA (default .gpu_data),
# BATCH (crops a step, default 32), CROP (default 256), PYTHON (default python3), CANDIDATES (lines
# "NAME OUTPUT-NAME vqcli-train-options...", replacing the list above; EXTRA_CANDIDATES adds to it), DRY_RUN=1 (CPU, a few
# seconds each, 32-pixel crops, evaluation on 64-pixel crops: to check the script anywhere).
# A candidate that fails is reported with the end of its log; the others still finish.
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 1 ] || { echo "usage: $0 OUT_DIR" >&2; exit 2; }
out=$1
mkdir -p "$out"
python=${PYTHON:-python3}
data=${DATA:-.gpu_data}
minutes=${MINUTES:-3.5}
batch=${BATCH:-32}
crop=${CROP:-256}
device=cuda
eval_args=()
if [ "${DRY_RUN:-0}" = 1 ]; then
  device=cpu minutes=${MINUTES:-0.05} batch=${BATCH:-2} crop=${CROP:-32}
  eval_args=(--eval-size 64)
fi
if [ ! -d "$data/train" ]; then
  echo "error: $data/train: no training images (make them with scripts/get_training_data.sh and scripts/pack_gpu_data.py)" >&2
  exit 1
fi
default_candidates="kl-f4 default --preset default
kl-f8 default --preset default --ch-mult 1,1,2,2 --z-channels 16
vq-f4 default-vq --preset default-vq"
candidates=${CANDIDATES:-$default_candidates}
[ -n "${EXTRA_CANDIDATES:-}" ] && candidates+=$'\n'"$EXTRA_CANDIDATES"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log=$out/log
: >"$log"
started=$(date +%s)
{
  echo "train_gpu.sh: $(date -u +%FT%TZ), device $device, $minutes minutes each, batch $batch, crop $crop, data $data"
  "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))'
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
} >>"$log" 2>&1

threads=$(( $(nproc) / 3 )); [ "$threads" -lt 1 ] && threads=1
pids=()
while read -r name output options; do
  [ -z "$name" ] && continue
  mkdir -p "$work/$name"
  # shellcheck disable=SC2086  # the options are words
  (
    OMP_NUM_THREADS=$threads PYTHONPATH=. PYTHONUNBUFFERED=1 "$python" -m vqcli train "$data/train" \
      -o "$work/$name/$output.safetensors" $options --device "$device" --max-minutes "$minutes" --steps 1000000 \
      --batch-size "$batch" --crop "$crop" --warmup 100 --ema-decay 0.998 --checkpoint-every 1000000 --overwrite --json \
      >"$work/$name/summary.json" 2>"$work/$name/log"
    echo $? >"$work/$name/rc"
  ) &
  pids+=($!)
done <<<"$candidates"
wait "${pids[@]}"

for folder in "$work"/*/; do
  name=$(basename "$folder")
  { echo; echo "=== $name (exit $(cat "$folder/rc" 2>/dev/null || echo missing))"; cat "$folder/log"; } >>"$log"
done
echo "training done after $(( $(date +%s) - started )) s" >>"$log"

val=()
[ -d "$data/val" ] && val=(--val "$data/val")
PYTHONPATH=. "$python" scripts/gpu_report.py "$work" "$out" --device "$device" "${eval_args[@]}" "${val[@]}" >>"$log" 2>&1
rc=$?
echo "report exit $rc; all done after $(( $(date +%s) - started )) s" >>"$log"
tail -n 40 "$out/report.md" 2>/dev/null || tail -n 40 "$log"
exit $rc
