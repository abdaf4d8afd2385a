#!/usr/bin/env bash
# The GPU check: run it on a CUDA machine with clipcoco installed from this checkout with all its extras
# (`make install`, or pip install -e '.[dali,plot,demo,dev]'). CI has no GPU; this covers what it cannot:
# DALI `mixed` decoding, bf16 + channels_last training, embed-text and eval on CUDA.
#
#   bash scripts/gpu_check.sh                 # results in a new temporary folder (printed at the end)
#   OUT=gpu-results bash scripts/gpu_check.sh
#
# Steps: generated COCO-size data (`clipcoco bench data`) sharded; `pytest -m gpu` (on coco-mini when
# CLIPCOCO_COCO_MINI points at it, else on 80 generated images); `clipcoco bench loader` with DALI and with the
# torch loader; `clipcoco bench embed-text` over about as many captions as COCO has (616,767) with a random
# DistilBERT-sized model; `clipcoco bench train` fed by DALI against synthetic batches; clipcoco's training against
# open_clip's trainer with --lock-text (scripts/vs_open_clip.py side, bf16). Each step's JSON line and
# log go to $OUT; a failed step is reported and the others still run. A summary table is printed last.
#
# Sizes (environment): IMAGES (2048), CAPTIONS_PER_IMAGE (300), BATCH (256), STEPS (30), LOADER_BATCHES (40),
# IMAGE_SIZE (224), MODEL (resnet50), THREADS (cores - 2), DEVICE (cuda), PYTHON (python). Keep IMAGES a multiple of BATCH: in
# training mode DALI decodes an epoch's last partial batch and drops it, so a remainder is decoded but not counted.
# A CPU dry run: DEVICE=cpu IMAGES=32 CAPTIONS_PER_IMAGE=5 BATCH=8 STEPS=2 LOADER_BATCHES=2 IMAGE_SIZE=64 \
#   MODEL=resnet18 THREADS=2 bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

IMAGES=${IMAGES:-2048} CAPTIONS_PER_IMAGE=${CAPTIONS_PER_IMAGE:-300} BATCH=${BATCH:-256} STEPS=${STEPS:-30}
LOADER_BATCHES=${LOADER_BATCHES:-40} IMAGE_SIZE=${IMAGE_SIZE:-224} MODEL=${MODEL:-resnet50} DEVICE=${DEVICE:-cuda}
CORES=$(nproc)
THREADS=${THREADS:-$(( CORES > 4 ? CORES - 2 : 2 ))}
OUT=${OUT:-$(mktemp -d -t clipcoco-gpu-check.XXXXXX)}
WORK=$OUT/work
mkdir -p "$WORK"
: > "$OUT/steps.tsv"

# step NAME CMD...: stdout to $OUT/NAME.out (its last line is the JSON a bench command prints), stderr to
# $OUT/NAME.log; the exit status and the seconds taken go to steps.tsv.
step() {
  local name=$1 start=$SECONDS rc
  shift
  echo "-- $name: $*"
  "$@" > "$OUT/$name.out" 2> "$OUT/$name.log"
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( SECONDS - start ))" >> "$OUT/steps.tsv"
  [ "$rc" -eq 0 ] || { echo "   failed (exit $rc); the end of $OUT/$name.log:"; tail -n 5 "$OUT/$name.log"; }
  return "$rc"
}

step env clipcoco bench env
step data clipcoco bench data "$WORK/coco" --images "$IMAGES" --captions-per-image "$CAPTIONS_PER_IMAGE"
step shards clipcoco shards --annotations "$WORK/coco/annotations/captions_val2017.json" \
  --images "$WORK/coco/val2017" --out "$WORK/shards" --samples-per-shard 256 --no-progress
step text-model clipcoco bench text-model "$WORK/text-model"

if [ -z "${CLIPCOCO_COCO_MINI:-}" ]; then
  step test-data clipcoco bench data "$WORK/coco-mini" --images 80
  export CLIPCOCO_COCO_MINI=$WORK/coco-mini
fi
step pytest "${PYTHON:-python}" -m pytest -m gpu -q

LOADER=(clipcoco bench loader --shards "$WORK/shards" --device "$DEVICE" --batch-size "$BATCH"
        --batches "$LOADER_BATCHES" --image-size "$IMAGE_SIZE" --threads "$THREADS")
step loader-dali "${LOADER[@]}" --loader dali
step loader-torch "${LOADER[@]}" --loader torch
# Also the training benchmark's text cache: every caption of the shards through the same model.
rm -f "$WORK/text.parquet"
step embed-text clipcoco bench embed-text --shards "$WORK/shards" --model "$WORK/text-model" --device "$DEVICE" \
  --out "$WORK/text.parquet"
step train clipcoco bench train --shards "$WORK/shards" --text "$WORK/text.parquet" --image-model "$MODEL" \
  --image-size "$IMAGE_SIZE" --batch-size "$BATCH" --steps "$STEPS" --loader dali --threads "$THREADS" \
  --device "$DEVICE" --precision bf16
# clipcoco against open_clip's own trainer with --lock-text on the same model, images and settings
# (scripts/vs_open_clip.py; it installs the webdataset open_clip's loader needs under $WORK/vs-open-clip): clipcoco
# fed by DALI (nvJPEG), open_clip by its webdataset loader, on these shards as they are and one sample per caption.
PRECISION=$([ "$DEVICE" = cuda ] && echo bf16 || echo fp32)
VS=("${PYTHON:-python}" scripts/vs_open_clip.py side --shape coco --shards "$WORK/shards" --text "$WORK/text.parquet"
    --device "$DEVICE" --precision "$PRECISION" --batch-size "$BATCH" --threads "$THREADS" --warmup 3
    --steps "$STEPS" --out "$WORK/vs-open-clip")
step vs-clipcoco "${VS[@]}" --side clipcoco --loader dali
step vs-open-clip "${VS[@]}" --side open_clip-shards
step vs-open-clip-per-caption "${VS[@]}" --side open_clip-per-caption

"${PYTHON:-python}" - "$OUT" <<'EOF'
import json, pathlib, sys

out = pathlib.Path(sys.argv[1])
steps = {name: rc for name, rc, _ in (line.split("\t") for line in (out / "steps.tsv").read_text().splitlines())}


def result(name):  # the JSON line a step printed last, or {} when it failed
    lines = (out / f"{name}.out").read_text().strip().splitlines() if steps.get(name) == "0" else []
    return json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}


def fmt(value, spec=",.0f"):
    return "n/a" if value is None else format(value, spec)


env, dali, torch, embed, train = (result(n) for n in ("env", "loader-dali", "loader-torch", "embed-text", "train"))
ours, peer, per_caption = (result(n) for n in ("vs-clipcoco", "vs-open-clip", "vs-open-clip-per-caption"))
tests = (out / "pytest.out").read_text().strip().splitlines() if (out / "pytest.out").is_file() else []
versions = env.get("versions", {})
dali_version = versions.get("nvidia-dali-cuda130") or versions.get("nvidia-dali-cuda120")
rows = [
    ("card", f"{env.get('gpu', 'n/a')} | torch {versions.get('torch')} (CUDA {env.get('cuda')}) | DALI {dali_version}"),
    ("pytest -m gpu", tests[-1].strip("= ") if tests else "did not run"),
    ("DALI loader", f"{fmt(dali.get('images_per_s'))} images/s on {dali.get('device', 'n/a')}"),
    ("torch loader", f"{fmt(torch.get('images_per_s'))} images/s"),
    ("embed-text", f"{fmt(embed.get('captions'))} captions in {fmt(embed.get('seconds'), '.1f')} s, model load "
                   f"included: {fmt(embed.get('captions_per_s'))} captions/s"),
    ("train, real (DALI)", f"{fmt(train.get('real_images_per_s'))} images/s ({train.get('image_model')}, "
                           f"{train.get('image_size')} px, {train.get('precision')}, batch {train.get('batch_size')})"),
    ("train, synthetic", f"{fmt(train.get('synthetic_images_per_s'))} images/s"),
    ("real / synthetic", f"{fmt(train.get('ratio'), '.3f')}; data wait {fmt(train.get('data_wait_fraction'), '.1%')}"),
    ("vs open_clip", f"clipcoco {fmt(ours.get('images_per_s'))} images/s; open_clip --lock-text "
                     f"{fmt(peer.get('images_per_s'))} (its shards), {fmt(per_caption.get('images_per_s'))} (one "
                     "sample per caption)"),
    ("failed steps", ", ".join(f"{name} (exit {rc})" for name, rc in steps.items() if rc != "0") or "none"),
]
print("\n== GPU check ==")
for name, value in rows:
    print(f"{name:<20}  {value}")
EOF
echo "results: $OUT"
