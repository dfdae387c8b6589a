#!/usr/bin/env bash
# Validate a single-GPU box in under 8 minutes of machine time (docs/benchmarks.md, "GPU check").
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--work DIR] [--budget-s S] [--rehearsal]
#
# Runs the steps of benchmarks/gpu_check.py in order of value, each under its own `timeout`
# and all within --budget-s (a step that would start with under 10 s left is recorded as
# skipped). Each step's record {step, ok, seconds, numbers..., error and log tail if it failed}
# is appended to DIR/gpu_check.jsonl as soon as it finishes, and DIR/gpu_check_logs.tar.gz is
# refreshed after every step. Every step runs even when an earlier one failed; the exit status
# is 1 when any step failed.
#
#   --out DIR     where the two files go (default: $OUT, as on a lent GPU machine)
#   --work DIR    where the artefacts are built (default: a new folder under /tmp)
#   --budget-s S  wall-clock budget of all steps (default 420; rehearsal 300)
#   --rehearsal   the same steps on CPU with the tiny shapes (minutes on 2 cores)
#
# Without megatron-core (the lent GPU machine has none), the wheels in .whl/ are installed
# into a folder on PYTHONPATH first: make them with benchmarks/gpu_wheels.sh and carry .whl/.
# PYTHON (default python3) is the interpreter.
set -uo pipefail   # no -e: a failed step must not stop the steps after it

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR=${OUT:-}
WORK=""
BUDGET_S=""
MODE=()
while (($#)); do
    case $1 in
        --out) OUT_DIR=$2; shift 2 ;;
        --work) WORK=$2; shift 2 ;;
        --budget-s) BUDGET_S=$2; shift 2 ;;
        --rehearsal) MODE=(--rehearsal); shift ;;
        -h|--help) sed -n '2,/^set /p' "$0" | sed 's/^# \{0,1\}//' | head -n -1; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ -n $OUT_DIR ]] || { echo "gpu_check: give --out DIR (or set \$OUT)" >&2; exit 2; }

# name and timeout (s) of each step, in order of value
if ((${#MODE[@]})); then
    STEPS=(environment:60 fp32_device_vs_cpu:120 bf16_sigterm_resume:150 throughput:90
           convert_verify:120 eval_run:90 train_async_save:90)
    BUDGET_S=${BUDGET_S:-300}
    export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1   # CPU only, one thread per process
else
    STEPS=(environment:60 fp32_device_vs_cpu:75 bf16_sigterm_resume:90 throughput:150
           convert_verify:120 eval_run:75 train_async_save:120)
    BUDGET_S=${BUDGET_S:-420}
fi

PYTHON=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=${WORK:-$(mktemp -d /tmp/gpu-check.XXXXXX)}
mkdir -p "$WORK/logs"
WORK=$(cd "$WORK" && pwd)
JSONL=$OUT_DIR/gpu_check.jsonl
: >"$JSONL"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONWARNINGS=ignore

now() { date +%s.%N; }
START=$(now)
elapsed() { awk -v a="$START" -v b="$(now)" 'BEGIN { printf "%d", b - a }'; }

# megatron-core and zstandard from the carried wheels when this Python lacks them
install_wheels() {
    "$PYTHON" -c 'import importlib.util as u
exit(not (u.find_spec("megatron") and u.find_spec("megatron.core") and u.find_spec("zstandard")))' \
        2>/dev/null && return 0
    local wheels=(.whl/*.whl)
    if [[ ! -e ${wheels[0]} ]]; then
        echo "gpu_check: megatron-core does not import and .whl/ holds no wheels" \
             "(run benchmarks/gpu_wheels.sh and carry .whl/)" >&2
        return 1
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --target "$WORK/site" "${wheels[@]}" &&
        export PYTHONPATH=$WORK/site:$PYTHONPATH
}

pack_logs() {
    (cd "$WORK" && find . -path ./site -prune -o \( -name '*.log' -o -name metrics.jsonl \
        -o -name run.json -o -name exit_status.json -o -name config.yaml -o -path './records/*' \
        -o -path './logs/*.json' \) -type f -print0 |
        tar -czf "$OUT_DIR/gpu_check_logs.tar.gz" --null -T -) 2>/dev/null
}

FAILED=()
run_step() {   # run_step NAME TIMEOUT
    local name=$1 limit=$2 left t0 rc
    left=$((BUDGET_S - $(elapsed)))
    ((limit > left)) && limit=$left
    t0=$(now)
    rm -f "$WORK/records/$name.json"
    if ((limit < 10)); then
        "$PYTHON" benchmarks/gpu_check.py finish "$name" --work "$WORK" --rc 125 --seconds 0 \
            --jsonl "$JSONL" --error "skipped: the ${BUDGET_S} s budget is spent"
        FAILED+=("$name")
        return
    fi
    timeout --kill-after=15 "$limit" "$PYTHON" benchmarks/gpu_check.py run "$name" \
        --work "$WORK" "${MODE[@]}" >"$WORK/logs/$name.log" 2>&1
    rc=$?
    "$PYTHON" benchmarks/gpu_check.py finish "$name" --work "$WORK" --rc "$rc" --limit "$limit" \
        --seconds "$(awk -v a="$t0" -v b="$(now)" 'BEGIN { print b - a }')" --jsonl "$JSONL"
    ((rc == 0)) || FAILED+=("$name")
    pack_logs
}

echo "[gpu_check] work folder $WORK, records in $JSONL, budget ${BUDGET_S} s" \
     "${MODE[*]:+(rehearsal: CPU, tiny shapes)}"
install_wheels >"$WORK/logs/install_wheels.log" 2>&1 || cat "$WORK/logs/install_wheels.log" >&2
for entry in "${STEPS[@]}"; do
    run_step "${entry%%:*}" "${entry##*:}"
done
pack_logs
echo "[gpu_check] $((${#STEPS[@]} - ${#FAILED[@]}))/${#STEPS[@]} steps ok in $(elapsed) s" \
     "${FAILED[*]:+; failed: ${FAILED[*]}}"
((${#FAILED[@]} == 0))
