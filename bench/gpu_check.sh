#!/usr/bin/env bash
# Issue 5's GPU figures in one run that fits 10 minutes on one CUDA GPU (sd15-shapes, 512 px, fp16):
#   0. the lesson scripts themselves, end to end on the tiny model, in fp16 and bf16/auto (pass or fail);
#   1. training: our 3b step vs the floor and the course's loop, with gradient checkpointing, peak allocated
#      memory, and the 3a step; seconds for an 800-step 3b run, extrapolated from the measured steps;
#   2. generation: morph frames/s vs one pipeline call per frame (25 steps, the script's batch of 8), the
#      450-frame morph in seconds (extrapolated), exercise 1, class images and FAST_MODE.
# Results: bench/results/ (or $OUT when set): gpu-summary.txt (with one line per lesson script run in step 0),
# two JSON records, three logs and profiles.tar.gz (seven files).
#
#   bash bench/gpu_check.sh                 # on a machine with a CUDA GPU
#   ARCH=tiny DEVICE=cpu RES=64 PRECISION=no SCRIPT_PRECISIONS="bf16 no" bash bench/gpu_check.sh
#                                           # a dry run of the plumbing, anywhere
#
# Where diffusers is missing but its wheel (and importlib_metadata's) lies in .whl/, they are installed into
# /tmp/site first (for machines that cannot reach the package index).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${OUT:-bench/results}"
mkdir -p "$RESULTS"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if ! "$PY" -c "import diffusers" 2>/dev/null; then
  if ! ls .whl/diffusers-*.whl >/dev/null 2>&1; then
    echo "diffusers is not installed and no .whl/diffusers-*.whl was carried: see bench/README.md"; exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 2
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
SUMMARY="$RESULTS/gpu-summary.txt"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, diffusers, transformers, peft, accelerate as a; print('torch', torch.__version__,
'| diffusers', diffusers.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__,
'| accelerate', a.__version__)"; } | tee "$SUMMARY"
ARCH="${ARCH:-sd15-shapes}" DEVICE="${DEVICE:-cuda}" RES="${RES:-512}" PRECISION="${PRECISION:-fp16}"
COMMON=(--arch "$ARCH" --device "$DEVICE" --resolution "$RES" --precision "$PRECISION" --results-dir "$RESULTS")
TRAIN="gpu-train-$ARCH-$RES-$PRECISION-gc" GENERATE="gpu-generate-$ARCH-$RES-$PRECISION"
status=0

# 0. The lessons themselves on the GPU (~1 min): each script as a student runs it, on the built-in tiny model, in
#    fp16 and in the card's own choice (auto: bf16 where supported). What the CPU tests cannot reach: half
#    precision on CUDA (the CPU tests run bf16), models moved between the GPU and the CPU. One line each below.
for mp in ${SCRIPT_PRECISIONS:-fp16 auto}; do
  D=(--model tiny --device "$DEVICE" --mixed-precision "$mp")
  L="models/gpu-check-$mp" O="outputs/gpu-check-$mp"
  for run in "exercise3b_train_lora.py --max-train-steps 4 --sample-every 2 --num-class-images 4 --lora-dir $L --output-dir $O --class-data-dir class_images/gpu-check-$mp" \
             "exercise3a_train_textual_inversion.py --max-train-steps 4 --sample-every 2 --lora-dir $L --embedding-dir $L-ti --output-dir $O" \
             "exercise1_generate.py --lora-path $L --embedding-path $L-ti --output-dir $O" \
             "exercise2_explore.py --lora-path $L --output-dir $O" \
             "generate_dreambooth_morph.py --lora-path $L --duration-seconds 2 --fps 8 --output-dir $O"; do
    # shellcheck disable=SC2086
    timeout 120 "$PY" $run "${D[@]}" > "$RESULTS/gpu-scripts.log.tmp" 2>&1; rc=$?
    cat "$RESULTS/gpu-scripts.log.tmp" >> "$RESULTS/gpu-scripts.log"
    echo "script ${run%% *} --mixed-precision $mp: rc $rc $(tr '\r' '\n' < "$RESULTS/gpu-scripts.log.tmp" | grep -E '^ERROR|Done' | tail -1)" | tee -a "$SUMMARY"
    [ "$rc" = 0 ] || status=1
  done
done
rm -f "$RESULTS/gpu-scripts.log.tmp"

# 1. Training (~1-2 min): 2 warm-ups + 10 timed steps per variant, round-robin; --profile for the 3b/3a reasons.
timeout 240 "$PY" bench/bench_train.py "${COMMON[@]}" --gradient-checkpointing --warmup 2 --steps 10 \
  --name "$TRAIN" --profile 2>&1 | tee "$RESULTS/gpu-train.log" || status=1

# 2. Generation (~2-4 min): the scripts' steps (morph/class 25, exercise 1 30), 2 timed runs of each variant.
timeout 300 "$PY" bench/bench_generate.py "${COMMON[@]}" --warmup 1 --repeats 2 --frames 32 --images 9 \
  --class-images 16 --fast-images 4 --parts morph,exercise1,class,fast --name "$GENERATE" \
  2>&1 | tee "$RESULTS/gpu-generate.log" || status=1

# Profiles in one file; then the figures issue 5 asks for, from the JSON just written.
(cd "$RESULTS" && ls ./*.profile.txt >/dev/null 2>&1 && tar czf profiles.tar.gz ./*.profile.txt && rm -f ./*.profile.txt)
"$PY" - "$RESULTS" "$TRAIN" "$GENERATE" <<'EOF' | tee -a "$SUMMARY"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
try:
    t = json.loads((out / f"{sys.argv[2]}.json").read_text())["results"]
    b = t["3b"]
    print(f"3b step: ours {b['variants']['ours']['median_s']:.3f} s, ours/floor {b['ratios']['ours/floor']:.3f} "
          f"(target <= 1.10), ours/course {b['ratios']['ours/course']:.3f}; peak allocated "
          f"{b['variants']['ours']['peak_memory_gib']:.2f} GiB (target <= 4 GiB)")
    print(f"800-step 3b run: {b['script_run_s_extrapolated']:.0f} s (training loop only)")
    if "3a" in t:
        print(f"3a step: ours/floor {t['3a']['ratios']['ours/floor']:.3f}; 3000 x 4 run "
              f"{t['3a']['script_run_s_extrapolated']:.0f} s")
except (OSError, KeyError, ValueError) as exc:
    print(f"training figures missing: {exc!r}")
try:
    g = json.loads((out / f"{sys.argv[3]}.json").read_text())["results"]
    m = g["morph"]
    print(f"morph: {m['variants']['ours']['per_s']:.2f} frames/s vs {m['variants']['per_call_loop']['per_s']:.2f} "
          f"per call: x{m['ratios']['ours/per_call_loop frames/s']:.2f} (target >= 3); 450 frames: "
          f"{m['morph_450_frames_s_extrapolated']:.0f} s")
    for part in ("exercise1", "class", "fast"):
        if part in g:
            print(f"{part}: " + ", ".join(f"{k} {v:.2f}" for k, v in g[part]["ratios"].items()))
except (OSError, KeyError, ValueError) as exc:
    print(f"generation figures missing: {exc!r}")
EOF
exit $status
