#!/usr/bin/env bash
# The GPU check of issue 9 in ONE device call: generated COCO-size shards, DALI `mixed` vs the torch loader,
# resnet50 bf16 training fed by real shards vs synthetic in-GPU batches, embed-text throughput of a
# DistilBERT-sized model, and `pytest -m gpu`. JSON under $OUT (8 files at most), a short table printed last.
#
#   bash scripts/gpu_check.sh prepare   # HERE, no device: DALI parts, wheels, coco-mini for tests/test_gpu.py
#   bash scripts/gpu_check.sh           # ON the GPU machine (or a CPU dry run, below)
#
# ---- The device calls (copy them as they are; make them back to back: the machine goes cold ~30 s idle) ----
# 0. Here: `bash scripts/gpu_check.sh prepare` (~2 min; writes .devdali/part-00..03, sha256, unpack.sh,
#    .devdali/coco-mini and .whl/; all git-ignored). `status` must say can_start_another: true.
# 1. run  carry [".devdali/part-00"]                                     command "ls -l .devdali"
# 2. run  carry [".devdali/part-01"]                                     command "ls -l .devdali"
# 3. run  carry [".devdali/part-02"]                                     command "ls -l .devdali"
# 4. run  carry [".devdali/coco-mini", ".whl"]                           command "ls -l .devdali .whl"
# 5. run  carry [".devdali/part-03", ".devdali/sha256", ".devdali/unpack.sh"]   timeout_s 420, command:
#    bash .devdali/unpack.sh 4 && export PYTHONPATH=/tmp/devsite:$PWD GPU_CHECK_WORK=/tmp/gpu-check && bash scripts/gpu_check.sh
# 6. give_back (unless rerunning 5 at once). If 5 says a part is missing, the machine went cold: redo 1-5.
#    The results lie under files_at (summary.json has everything; the table is the end of output_tail).
#    A rerun on the still-warm machine (DALI stays unpacked in /tmp/devsite, the data in /tmp/gpu-check), no
#    carry, of some steps only, e.g. the tests or the training benchmark:
#    export PYTHONPATH=/tmp/devsite:$PWD GPU_CHECK_WORK=/tmp/gpu-check && GPU_CHECK_ONLY=pytest bash scripts/gpu_check.sh
#    export PYTHONPATH=/tmp/devsite:$PWD GPU_CHECK_WORK=/tmp/gpu-check && GPU_CHECK_ONLY="train" bash scripts/gpu_check.sh
#    Typical run on an H100: ~4-5 min (budget 330 s + unpack); device time: start + 5 calls, ~8-9 min of 15.
# ---------------------------------------------------------------------------------------------------------------
#
# CPU dry run (every step runs; the GPU tests skip):
#   PYTHON=.venv/bin/python GPU_CHECK_DEVICE=cpu GPU_CHECK_IMAGES=40 GPU_CHECK_CAPTIONS=2000 GPU_CHECK_BATCH=8 \
#     GPU_CHECK_STEPS=2 GPU_CHECK_LOADER_BATCHES=3 GPU_CHECK_IMAGE_SIZE=64 GPU_CHECK_MODEL=resnet18 \
#     GPU_CHECK_TEXT_DIM=64 GPU_CHECK_TEXT_LAYERS=2 GPU_CHECK_THREADS=2 GPU_CHECK_SHARD_SIZE=16 bash scripts/gpu_check.sh
#
# Knobs (environment): OUT (default: a new temp dir), GPU_CHECK_WORK (scratch, default: a new temp dir),
# GPU_CHECK_DEVICE (cuda), GPU_CHECK_IMAGES (2048), GPU_CHECK_CAPTIONS (200000), GPU_CHECK_BATCH (256),
# GPU_CHECK_STEPS (30), GPU_CHECK_LOADER_BATCHES (40), GPU_CHECK_IMAGE_SIZE (224), GPU_CHECK_MODEL (resnet50),
# GPU_CHECK_THREADS (cores - 2), GPU_CHECK_SHARD_SIZE (256), GPU_CHECK_TEXT_DIM (768), GPU_CHECK_TEXT_LAYERS (6),
# GPU_CHECK_EMBED_BATCH (unset: embed-text's own default), GPU_CHECK_BUDGET (330: seconds for all steps; each step's
# timeout is its own limit or what is left of the budget, whichever is less), GPU_CHECK_ONLY (space-separated step
# names to run, e.g. "pytest"; default all; the probe always runs), PYTHON (python3).
# Keep IMAGES a multiple of BATCH: in training mode the DALI loader decodes an epoch's last partial batch and drops
# it (its reader must reach the epoch's end), so a remainder would be decoded but not counted.
# Steps: probe imports coco shards loader-dali loader-torch text-model text-cache train [train-torch] autotune
# captions embed-text pytest; then the summary.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

if [ "${1:-}" = "prepare" ]; then
  set -e
  bash ../shared/device/pack-dali.sh
  mkdir -p .devdali/coco-mini/annotations
  cp -r ../shared/coco-mini/val2017 .devdali/coco-mini/
  cp ../shared/coco-mini/annotations/captions_val2017.json .devdali/coco-mini/annotations/
  # pack-dali.sh carries webdataset + braceexpand already; these are the fallback for whatever the machine lacks.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
    webdataset==1.0.2 braceexpand pyyaml rich markdown-it-py mdurl pygments
  du -sh .devdali/part-* .devdali/coco-mini .whl
  exit 0
fi

PY=${PYTHON:-python3}
DEV=${GPU_CHECK_DEVICE:-cuda}
IMAGES=${GPU_CHECK_IMAGES:-2048}
CAPTIONS=${GPU_CHECK_CAPTIONS:-200000}
BATCH=${GPU_CHECK_BATCH:-256}
STEPS=${GPU_CHECK_STEPS:-30}
LOADER_BATCHES=${GPU_CHECK_LOADER_BATCHES:-40}
SIZE=${GPU_CHECK_IMAGE_SIZE:-224}
MODEL=${GPU_CHECK_MODEL:-resnet50}
CORES=$(nproc)
THREADS=${GPU_CHECK_THREADS:-$(( CORES > 4 ? CORES - 2 : 2 ))}
SHARD_SIZE=${GPU_CHECK_SHARD_SIZE:-256}
TEXT_DIM=${GPU_CHECK_TEXT_DIM:-768}
TEXT_LAYERS=${GPU_CHECK_TEXT_LAYERS:-6}
EMBED_BATCH=${GPU_CHECK_EMBED_BATCH:-}
BUDGET=${GPU_CHECK_BUDGET:-330}
ONLY=${GPU_CHECK_ONLY:-}
OUT=${OUT:-$(mktemp -d -t gpu-check-out.XXXXXX)}
WORK=${GPU_CHECK_WORK:-$(mktemp -d -t gpu-check-work.XXXXXX)}
mkdir -p "$OUT" "$WORK"
# This run's files only, even in a reused $OUT (nothing else there is touched).
rm -f "$OUT"/{env,loader-dali,loader-torch,train,embed-text,summary}.json "$OUT/pytest.txt"
: > "$WORK/steps.tsv"
: > "$OUT/log.txt"

# DALI unpacked by .devdali/unpack.sh; the project itself runs from its tree (nothing is pip-installed there).
if [ -d /tmp/devsite ] && [[ ":${PYTHONPATH:-}:" != *":/tmp/devsite:"* ]]; then
  PYTHONPATH=/tmp/devsite${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
# ../shared does not travel to the GPU machine: the tests find the carried copy of coco-mini by this variable.
if [ -d .devdali/coco-mini ] && [ ! -e ../shared/coco-mini ]; then
  export CLIPCOCO_COCO_MINI=$ROOT/.devdali/coco-mini
fi

CLIPCOCO=("$PY" -c 'import sys; sys.argv[0] = "clipcoco"; from cli.main import main; main()')
START=$(date +%s)

selected() { [ -z "$ONLY" ] || [[ " $ONLY probe " == *" $1 "* ]]; }

# step NAME MAX_SECONDS CMD...: runs CMD under `timeout` (its limit or what is left of the budget), stdout to
# $WORK/NAME.out, stderr to $WORK/NAME.err; records rc and seconds; a step after the budget is spent is skipped.
step() {
  local name=$1 limit=$2
  shift 2
  if ! selected "$name"; then
    printf '%s\tunselected\t0\n' "$name" >> "$WORK/steps.tsv"
    return 1
  fi
  local left=$(( BUDGET - ($(date +%s) - START) ))
  (( left < limit )) && limit=$left
  if (( limit < 5 )); then
    printf '%s\tbudget\t0\n' "$name" >> "$WORK/steps.tsv"
    echo "-- $name: skipped, the ${BUDGET} s budget is spent" | tee -a "$OUT/log.txt"
    return 1
  fi
  local t0 rc
  t0=$(date +%s.%N)
  timeout -k 10 "$limit" "$@" > "$WORK/$name.out" 2> "$WORK/$name.err"
  rc=$?
  local seconds
  seconds=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  printf '%s\t%s\t%s\n' "$name" "$rc" "$seconds" >> "$WORK/steps.tsv"
  { echo "-- $name: rc $rc in $seconds s (limit $limit s): $*"; tail -n 15 "$WORK/$name.err"; tail -n 5 "$WORK/$name.out"; } \
    >> "$OUT/log.txt"
  echo "-- $name: rc $rc in $seconds s"
  [ "$rc" -eq 0 ]
}

# The last JSON line of a step's stdout (the bench commands print theirs last) into $OUT.
keep_json() { grep '^{' "$WORK/$1.out" | tail -n 1 > "$OUT/$2"; }

step probe 60 "$PY" scripts/gpu_check.py probe && keep_json probe env.json
[ -n "$(command -v nvidia-smi)" ] && nvidia-smi >> "$OUT/log.txt" 2>&1

# What the project imports that the machine may lack: the carried wheels, unpacked after everything else on the
# path, so that the machine's own packages win and only missing ones come from .whl/.
if ! "$PY" -c 'import webdataset, braceexpand, yaml, rich, typer' 2>/dev/null && ls .whl/*.whl > /dev/null 2>&1; then
  for wheel in .whl/*.whl; do "$PY" -m zipfile -e "$wheel" "$WORK/site"; done
  export PYTHONPATH=$PYTHONPATH:$WORK/site
fi
step imports 60 "$PY" -c 'import webdataset, yaml, rich, typer, pyarrow, transformers, nvidia.dali, cli.main'

step coco 120 "$PY" scripts/gpu_check.py coco "$WORK/coco" --images "$IMAGES" --workers "$CORES"
step shards 120 "${CLIPCOCO[@]}" shards --annotations "$WORK/coco/annotations/captions_val2017.json" \
  --images "$WORK/coco/val2017" --out "$WORK/shards" --samples-per-shard "$SHARD_SIZE" --no-progress

LOADER=(bench loader --shards "$WORK/shards" --device "$DEV" --batch-size "$BATCH" --batches "$LOADER_BATCHES"
        --image-size "$SIZE" --threads "$THREADS")
# nvidia-smi dmon's `jpg` column is the hardware JPEG engines' load: non-zero while DALI decodes = NVJPG used.
dmon=
if [ "$DEV" = cuda ] && selected loader-dali && command -v nvidia-smi > /dev/null; then
  nvidia-smi dmon -s u -d 1 > "$WORK/dmon.log" 2>&1 &
  dmon=$!
fi
step loader-dali 120 "${CLIPCOCO[@]}" "${LOADER[@]}" --loader dali && keep_json loader-dali loader-dali.json
[ -n "$dmon" ] && kill "$dmon" 2> /dev/null
step loader-torch 120 "${CLIPCOCO[@]}" "${LOADER[@]}" --loader torch && keep_json loader-torch loader-torch.json

step text-model 120 "$PY" scripts/gpu_check.py text-model "$WORK/text-model" --dim "$TEXT_DIM" --layers "$TEXT_LAYERS"
# The training benchmark's text cache: the shards' own captions through the same DistilBERT-shaped model. Both
# caches are removed first: in a reused work dir embed-text would find them up to date and time nothing.
selected text-cache && rm -f "$WORK/text.parquet"
selected embed-text && rm -f "$WORK/captions/text.parquet"
step text-cache 120 "${CLIPCOCO[@]}" embed-text "$WORK/shards" --model "$WORK/text-model" --device "$DEV" \
  --out "$WORK/text.parquet" --no-progress
step train 200 "${CLIPCOCO[@]}" bench train --shards "$WORK/shards" --text "$WORK/text.parquet" \
  --image-model "$MODEL" --image-size "$SIZE" --batch-size "$BATCH" --steps "$STEPS" --loader dali \
  --threads "$THREADS" --device "$DEV" --precision bf16 && keep_json train train.json
# Without a working DALI the real block still gets measured, fed by the torch loader (train.json says which).
if [ ! -s "$OUT/train.json" ] && [ ! -s "$OUT/loader-dali.json" ]; then
  step train-torch 200 "${CLIPCOCO[@]}" bench train --shards "$WORK/shards" --text "$WORK/text.parquet" \
    --image-model "$MODEL" --image-size "$SIZE" --batch-size "$BATCH" --steps "$STEPS" --loader torch \
    --threads "$THREADS" --device "$DEV" --precision bf16 && keep_json train-torch train.json
fi
step autotune 120 "$PY" scripts/gpu_check.py autotune --image-model "$MODEL" --image-size "$SIZE" \
  --batch-size "$BATCH" --steps "$STEPS" --device "$DEV"

step captions 60 "$PY" scripts/gpu_check.py captions "$WORK/captions" --captions "$CAPTIONS"
t0=$(date +%s.%N)
if step embed-text 200 "${CLIPCOCO[@]}" embed-text "$WORK/captions" --model "$WORK/text-model" --device "$DEV" \
    ${EMBED_BATCH:+--batch-size "$EMBED_BATCH"} --out "$WORK/captions/text.parquet" --no-progress; then
  seconds=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
  printf '{"captions": %s, "seconds": %s, "batch_size": "%s", "dim": %s, "layers": %s, "device": "%s"}\n' \
    "$CAPTIONS" "$seconds" "${EMBED_BATCH:-default}" "$TEXT_DIM" "$TEXT_LAYERS" "$DEV" > "$OUT/embed-text.json"
fi

# Only the modules holding GPU-marked tests: the others may import what this machine lacks (matplotlib, ...).
mapfile -t gpu_tests < <(grep -l 'mark\.gpu' tests/test_*.py)
step pytest 240 "$PY" -m pytest -m gpu -q -p no:cacheprovider "${gpu_tests[@]}"
selected pytest && cp "$WORK/pytest.out" "$OUT/pytest.txt" 2> /dev/null

"$PY" scripts/gpu_check.py summary --work "$WORK" --out "$OUT"
echo "results: $OUT ($(ls "$OUT" | tr '\n' ' '))"
