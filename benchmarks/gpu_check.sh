#!/usr/bin/env bash
# Every GPU figure of the step in one call (at most ~8 minutes on one H100): ViT-S/16 and ViT-B/16 (the paper's
# crops, K 8192, bf16) at batch 64 and 128, eager and compiled, ours beside the original iBOT code on the same card,
# MFU beside img/s, kernel time / launches / syncs (torch.profiler), and the largest batch that fits (measured)
# beside the cluster planner's estimate.
#
#   bash benchmarks/gpu_check.sh ORIGINAL_IBOT_CHECKOUT [OUT_DIR]
#
# ORIGINAL_IBOT_CHECKOUT: a copy of github.com/bytedance/ibot (main_ibot.py, utils.py, loader.py, models/,
# evaluation/unsupervised/ suffice); the GPU machine cannot fetch it, so it travels with the working tree (see the
# benchmarks guide). Runs from the repository root without the package installed (PYTHONPATH=.). Sections run in
# order of importance, each under its own time cap, all under DEADLINE_S (default 470 s); a section the deadline
# leaves no time for is reported as skipped. Results: OUT_DIR/results.jsonl (one JSON line per figure) and
# OUT_DIR/log.txt; a summary table at the end.
#
# DEVICE=cpu runs the eager sections once with tiny settings (the demo config, batch 2; the compiled ones too with
# SMOKE_COMPILE=1): a smoke test of the script. ORIGINAL_IBOT_CHECKOUT "-" leaves the original code out.
set -uo pipefail
cd "$(dirname "$0")/.."
ORIG=${1:?usage: gpu_check.sh ORIGINAL_IBOT_CHECKOUT [OUT_DIR]}
OUT_DIR=${2:-${OUT:-/tmp/gpu_check}}
DEVICE=${DEVICE:-cuda}
DEADLINE_S=${DEADLINE_S:-470}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
mkdir -p "$OUT_DIR"
RESULTS=$OUT_DIR/results.jsonl
LOG=$OUT_DIR/log.txt
: >"$RESULTS"
: >"$LOG"
START=$(date +%s)

# section NAME CAP_S ARGS...: one benchmarks/step_time.py run, capped at CAP_S and at what the deadline leaves
section() {
    local name=$1 cap=$(($2 * CAP_SCALE))
    shift 2
    local left=$((DEADLINE_S - ($(date +%s) - START)))
    local t=$((cap < left ? cap : left))
    if ((t < 20)); then
        echo "=== $name: skipped (${left} s left of the ${DEADLINE_S} s deadline)" | tee -a "$LOG"
        return
    fi
    echo "=== $name (cap ${t} s)" | tee -a "$LOG"
    timeout "$t" "$PY" benchmarks/step_time.py --device "$DEVICE" --json "$RESULTS" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    ((rc == 124)) && echo "=== $name: stopped at its ${t} s cap" | tee -a "$LOG"
    echo "=== $name: $(($(date +%s) - START)) s since the start" | tee -a "$LOG"
}

ORIGINAL=(--original "$ORIG")
[[ $ORIG == - ]] && ORIGINAL=()
COMPILED=1
CAP_SCALE=1
if [[ $DEVICE == cpu ]]; then
    CAP_SCALE=4  # a shared 2-core CI machine, not the GPU machine's 16 cores
    # one torch thread: on a busy 2-core machine two threads wait on each other (the demo step ~100x slower)
    S=(--config demo --set model.stem=patch --steps 1 --rounds 1 --threads 1)
    B=("${S[@]}")
    SMALL=2
    BIG=2
    COMPILED=${SMOKE_COMPILE:-0}
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
    S=(--config vit_small_16 --steps 10 --rounds 3)
    B=(--config vit_base_16 --steps 6 --rounds 3)
    SMALL=64
    BIG=128
fi
"$PY" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" 2>&1 | tee -a "$LOG"

BATCHES=$SMALL,$BIG
[[ $SMALL == "$BIG" ]] && BATCHES=$SMALL
section "ViT-S/16 eager, ours vs the original" 110 "${S[@]}" --batch "$BATCHES" --profile "${ORIGINAL[@]}" --no-baseline
((COMPILED)) && section "ViT-S/16 compiled" 160 "${S[@]}" --batch "$BIG" --compile --profile --no-baseline
section "ViT-B/16 eager, ours vs the original" 90 "${B[@]}" --batch "$BATCHES" "${ORIGINAL[@]}" --no-baseline
((COMPILED)) && section "ViT-B/16 compiled" 120 "${B[@]}" --batch "$BIG" --compile --no-baseline
if [[ $DEVICE == cpu ]]; then
    echo "=== the largest batch that fits: a CUDA device only" | tee -a "$LOG"
else
    section "ViT-S/16 the largest batch that fits" 60 --config vit_small_16 --steps 3 --rounds 1 --batch max \
        --no-baseline
    section "ViT-B/16 the largest batch that fits" 60 --config vit_base_16 --steps 2 --rounds 1 --batch max \
        --no-baseline
fi

echo "=== summary ($(($(date +%s) - START)) s)" | tee -a "$LOG"
"$PY" - "$RESULTS" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print(f"{'config':14} {'batch':>5} {'mode':8} {'ms/step':>8} {'img/s':>7} {'GF/img':>6} {'MFU':>6} {'orig img/s':>10} "
      f"{'speed-up':>8}  device")
for r in rows:
    if "images_per_device" in r:
        print(f"{r['config']:14} images_per_device measured {r['images_per_device']} (at the planner's "
              f"{r['measured_at_planner_fraction']} for its 50 %), planner estimate {r['planner_estimate']}; "
              f"{r['measured_mib_per_image']:.0f} MiB/img measured vs {r['planner_mib_per_image']:.0f} planned")
        continue
    mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
    orig = f"{r['original_img_per_s']:.0f}" if "original_img_per_s" in r else "-"
    speed = f"{r['speedup_vs_original']:.2f}x" if "speedup_vs_original" in r else "-"
    print(f"{r['config']:14} {r['batch']:5d} {'compiled' if r['compile'] else 'eager':8} {r['ms_per_step']:8.1f} "
          f"{r['img_per_s']:7.1f} {r['gflop_per_img']:6.1f} {mfu:>6} {orig:>10} {speed:>8}  {r['device']}")
EOF
