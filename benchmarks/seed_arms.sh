#!/usr/bin/env bash
# Several recipes, several seeds each, all at once on one machine: is a change to a preset bigger than what a seed
# moves a run? Every arm x seed is one benchmarks/recipe_probe.py process (one thread, one loader worker), all
# started together, sharing the GPU (DEVICE=cuda) and the cores. On an H100 with 16 cores nine 36-epoch demo probes
# ran in 247 s (docs/research-log.md, "Half the weight on the masked-patch loss").
#
#     bash benchmarks/seed_arms.sh OUT_DIR "SEEDS" NAME="--set k=v ..." [NAME="..." ...]
#     e.g. bash benchmarks/seed_arms.sh seeds_out "0 1 2" demo="" mim05="--set loss.lambda_mim=0.5"
#
# Each run's JSON lines go to OUT_DIR/NAME.sSEED.jsonl; the end prints, per arm, the teacher's and the student's final
# k-NN for every seed, their mean, and the random-init and raw-pixel k-NN of the same seeds (recipe_probe's first
# line). CONFIG (demo), DEVICE (cuda), EVAL_EVERY (12), TIME_LIMIT (seconds per run, 0: none) and PROBE_ARGS (added
# to every run) override the defaults.
set -u
[ $# -ge 3 ] || { echo 'usage: bash benchmarks/seed_arms.sh OUT_DIR "SEEDS" NAME="--set k=v ..." ...' >&2; exit 2; }
out=$1 seeds=$2; shift 2
mkdir -p "$out"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
limit=${TIME_LIMIT:-0}
for arm in "$@"; do
    name=${arm%%=*} sets=${arm#*=}
    for seed in $seeds; do
        # shellcheck disable=SC2086  # the arm's --set pairs are meant to split into words
        timeout "$limit" python3 benchmarks/recipe_probe.py --config "${CONFIG:-demo}" --device "${DEVICE:-cuda}" \
            --threads 1 --loader-workers 1 --epochs-per-eval "${EVAL_EVERY:-12}" \
            --set "train.seed=$seed" --set "data.seed=$seed" $sets ${PROBE_ARGS:-} \
            > "$out/$name.s$seed.jsonl" 2> "$out/$name.s$seed.err" &
    done
done
wait
python3 - "$out" "$@" <<'EOF'
import json, pathlib, statistics, sys

out = pathlib.Path(sys.argv[1])
for arm in sys.argv[2:]:
    name = arm.split("=", 1)[0]
    ends, firsts = {}, {}
    for path in sorted(out.glob(f"{name}.s*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
        seed = path.name[len(name) + 2:-len(".jsonl")]
        if rows and "random_init_knn" in rows[0]:
            firsts[seed] = rows[0]
        evals = [r for r in rows if "teacher_knn" in r and "epoch" in r]
        if evals:
            ends[seed] = evals[-1]
    if not ends:
        print(f"{name}: no evaluation finished (see {out}/{name}.s*.err)")
        continue
    teacher = [ends[s]["teacher_knn"] for s in sorted(ends)]
    student = [ends[s]["student_knn"] for s in sorted(ends)]
    print(f"{name} ({arm.split('=', 1)[1] or 'as configured'}): epoch {[ends[s]['epoch'] for s in sorted(ends)]}, "
          f"teacher {teacher} mean {statistics.mean(teacher):.2f}, student {student} mean {statistics.mean(student):.2f}, "
          f"random init {[firsts[s]['random_init_knn'] for s in sorted(firsts)]}, "
          f"raw pixels {[firsts[s]['pixel_knn'] for s in sorted(firsts)]}")
EOF
