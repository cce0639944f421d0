#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md and docs/research-log.md, in one call on a machine with one CUDA GPU
# (PyTorch and timm installed; Ray not needed):
#
#     bash benchmarks/gpu_recipes.sh TRAIN.parquet TEST.parquet OUT_DIR [BUDGET_SECONDS]
#
# 1. benchmarks/step_time.py on the paper's recipe (vit_small_16: 2 x 224 + 10 x 96 px crops, K = 8192, bf16):
#    the full iBOT step against the bare student update, batch 64.
# 2. Three recipes trained side by side on the one GPU by benchmarks/recipe_probe.py, each for the same budget of
#    seconds (each times its own steps first and plans its epochs to fit, so its schedules end with the budget):
#    small_gpu (8 px patches), small_gpu with 4 px patches, and the CPU demo recipe as shipped (the research log's figures
#    are from before small_gpu took the demo's stem and a constant momentum: PROBE_ARGS='--set model.stem=patch
#    --set optim.momentum_schedule=cosine' repeats them). Each ends with the k-NN of random init, raw pixels,
#    teacher and student on the full splits (FINAL_MAX images at most, 70,000 by default).
#    SET=stem runs another three instead, each written out in full so that it stays the same whatever the preset
#    becomes: the 12-block model with the linear patch embedding and the teacher momentum's cosine to 1 (small_gpu
#    before the stem comparison), with the demo's convolutional stem (model.stem=conv), and with the stem and a
#    constant momentum of 0.98. STEP=0 skips the step benchmark.
# Results: OUT_DIR/step_time.txt and one JSON-lines file per recipe. DEVICE, WORKERS, EVAL_MAX, FINAL_MAX and
# EVAL_EVERY override the defaults; PROBE_ARGS adds arguments to every probe (a CPU smoke run on a few hundred
# images: DEVICE=cpu WORKERS=1 STEP_BATCH=2 EVAL_MAX=300 FINAL_MAX=600 PROBE_ARGS='--set optim.batch_size=16' ... 5).
set -u
[ $# -ge 3 ] || { echo "usage: bash benchmarks/gpu_recipes.sh TRAIN.parquet TEST.parquet OUT_DIR [BUDGET_SECONDS]" >&2; exit 2; }
train=$1 test=$2 out=$3 budget=${4:-210}
device=${DEVICE:-cuda} workers=${WORKERS:-4}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

if [ "${STEP:-1}" != 0 ]; then
    timeout 150 python3 benchmarks/step_time.py --config vit_small_16 --batch "${STEP_BATCH:-64}" --steps 10 \
        --device "$device" > "$out/step_time.txt" 2>&1 || echo "step_time failed: see $out/step_time.txt"
    cat "$out/step_time.txt"
fi

common=(--set "data.source=$train" --set "data.eval_source=$test" --set "data.eval_max_images=${EVAL_MAX:-5000}"
        --final-eval-max-images "${FINAL_MAX:-70000}" --device "$device" --loader-workers "$workers"
        --budget-seconds "$budget" --epochs-per-eval "${EVAL_EVERY:-3}" --threads 2 ${PROBE_ARGS:-})
probe() {  # NAME ARGS...: one recipe in the background, its JSON lines in OUT_DIR/NAME.jsonl
    local name=$1; shift
    python3 benchmarks/recipe_probe.py "$@" "${common[@]}" > "$out/$name.jsonl" 2> "$out/$name.err" &
}
if [ "${SET:-recipes}" = stem ]; then
    probe small_gpu_patch_cosine --config small_gpu --set model.stem=patch --set optim.momentum_schedule=cosine
    probe small_gpu_stem_cosine --config small_gpu --set model.stem=conv --set optim.momentum_schedule=cosine
    probe small_gpu_stem_m098 --config small_gpu --set model.stem=conv \
        --set optim.momentum_teacher=0.98 --set optim.momentum_schedule=constant
else
    probe small_gpu --config small_gpu
    probe small_gpu_patch4 --config small_gpu --set model.patch_size=4
    probe demo --config demo
fi
wait
for f in "$out"/*.jsonl; do
    echo "== $f"; cat "$f"; tail -3 "${f%.jsonl}.err"
done
