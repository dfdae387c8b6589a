#!/bin/bash
# Continued pretraining of qwen2.5-3b on a random general sample size-matched to accounting (control): cell 3b/control_accounting of study 'qwen2.5-domain-cpt'.
# TP1 x PP1 x DP8 = 8 ranks on 1 node(s) of 8 GPUs.
# Rendered from configs/study.yaml by `megatron-cpt launch render-sbatch`;
# edit the study config and re-render instead of editing this file.
#
# Submit from the repository root:   sbatch slurm/cpt_3b_control_accounting.sh
# Resumes by itself: the trainer saves and exits 42 on SIGUSR1 (300 s before the time
# limit), SIGTERM (preemption, scontrol requeue) or its walltime margin; this script then requeues
# the same job, which continues from the latest checkpoint in the same run folder. A crash (any
# exit but 0, 2 bad input, 3 non-finite loss, 5 superseded by another launch, 42) is
# retried the same way up to MAX_FAILURES times;
# every launch's outcome is appended to $RUN_DIR/launches.jsonl. A requeue SLURM refuses exits 1.
#
# Overrides (environment variables at `sbatch` time; they are exported to the job):
#   SBATCH_PARTITION / SBATCH_ACCOUNT / SBATCH_QOS   partition, account, QOS (read by sbatch itself)
#   sbatch --nodes=N ...     more nodes = more data parallelism (global batch unchanged); keep N
#                            for the whole run: a resumed run must keep its world size
#   MCPT_STUDY_DIR           run folders (checkpoints, metrics)   default: runs/study
#   MCPT_DATA_ROOT           tokenized prefixes <corpus>_train / <domain>_valid   default: data/tokenized
#   MCPT_CKPT_ROOT           converted base checkpoints <model>/  default: checkpoints
#   MCPT_CONTAINER_IMAGE     run inside this image (pyxis/enroot srun --container-image)
#   MCPT_CONTAINER_MOUNTS    its --container-mounts (default: $REPO)
#   MCPT_ENV                 a file sourced first (module loads, virtualenv activation)
#   MCPT_PYTHON              the Python with megatron-cpt installed (default: python)
#   MCPT_REPO                the repository root (default: the submission directory)
#SBATCH --job-name=cpt_3b_control_accounting
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --time=2-00:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-cpt_3b_control_accounting-%j.out
set -uo pipefail

REPO="${MCPT_REPO:-$SLURM_SUBMIT_DIR}"
if [ -n "${MCPT_ENV:-}" ]; then source "$MCPT_ENV"; fi
PYTHON="${MCPT_PYTHON:-python}"
STUDY_DIR="${MCPT_STUDY_DIR:-$REPO/runs/study}"
DATA_ROOT="${MCPT_DATA_ROOT:-$REPO/data/tokenized}"
CKPT_ROOT="${MCPT_CKPT_ROOT:-$REPO/checkpoints}"
RUN_DIR="$STUDY_DIR/runs/3b/control_accounting"
MAX_REQUEUES=20
MAX_FAILURES=3

CONTAINER=()
if [ -n "${MCPT_CONTAINER_IMAGE:-}" ]; then
  CONTAINER=(--container-image="$MCPT_CONTAINER_IMAGE" --container-workdir="$REPO"
             --container-mounts="${MCPT_CONTAINER_MOUNTS:-$REPO}")
fi
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
export MASTER_PORT="$((20000 + SLURM_JOB_ID % 20000))"
echo "[$(date -u +%FT%TZ)] cpt_3b_control_accounting: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST -> $RUN_DIR"

rm -f "$RUN_DIR/exit_status.json"
srun --kill-on-bad-exit=1 ${CONTAINER[@]+"${CONTAINER[@]}"} \
  "$PYTHON" -m megatron_cpt train --config "$REPO/configs/train/study-base.yaml" \
    "run_dir=$RUN_DIR" \
    "model.pretrained=$CKPT_ROOT/qwen2.5-3b" \
    "data.train=[{prefix: $DATA_ROOT/control_accounting_train, weight: 1.0}]" \
    "data.valid=[{name: general, prefix: $DATA_ROOT/general_valid}, {name: legal, prefix: $DATA_ROOT/legal_valid}, {name: medical, prefix: $DATA_ROOT/medical_valid}, {name: accounting, prefix: $DATA_ROOT/accounting_valid}]" \
    "parallel.tp=1" \
    "parallel.pp=1" \
    "budget.tokens=20000000000" \
    "logging.wandb.group='qwen2.5-domain-cpt'" \
    "logging.mlflow.experiment='qwen2.5-domain-cpt'" \
    "logging.tags={study: 'qwen2.5-domain-cpt', size: '3b', domain: 'accounting', kind: 'control', cell: 'control_accounting'}"
rc=$?
# The trainer's own verdict (rank 0 writes it before the ranks leave together): srun's code can
# be a kill, because --kill-on-bad-exit stops the slower ranks once one has exited 42.
code="$(sed -n 's/.*"code": *\([0-9]*\).*/\1/p' "$RUN_DIR/exit_status.json" 2>/dev/null)"
code="${code:-$rc}"

HISTORY="$RUN_DIR/launches.jsonl"
record() {  # decision, note: one JSON line per launch
  local reason; case "$code" in
    0) reason="done" ;;
    2) reason="usage" ;;
    3) reason="nonfinite" ;;
    4) reason="hang" ;;
    5) reason="lease_lost" ;;
    42) reason="requeue" ;;
    *) reason="crash" ;;
  esac
  mkdir -p "$RUN_DIR"
  printf '{"time": "%s", "job": "%s", "restart": %s, "code": %s, "reason": "%s", "decision": "%s", "note": "%s"}\n' "$(date -u +%FT%TZ)" "$SLURM_JOB_ID" "${SLURM_RESTART_COUNT:-0}" "$code" "$reason" "$1" "$2" >> "$HISTORY"
}
failures="$(grep -F "\"job\": \"$SLURM_JOB_ID\"" "$HISTORY" 2>/dev/null | grep -c '"decision": "retry"')"
failures="${failures:-0}"
case "$code" in
  0) record finished ""; exit 0 ;;
  2|3|5) record failed "not retried"; exit "$code" ;;
  42)
    if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then
      record give_up "stopped early again after $MAX_REQUEUES requeues"
      echo "cpt_3b_control_accounting: stopped early again after $MAX_REQUEUES requeues; not requeueing (see $RUN_DIR/metrics.jsonl)" >&2
      exit 1
    fi
    decision=requeue ;;
  *)
    if [ "$failures" -ge "$MAX_FAILURES" ]; then
      record failed "crash after $failures retries (max_failures $MAX_FAILURES)"
      echo "cpt_3b_control_accounting: exit $code after $failures retries; max_failures reached" >&2
      exit "$code"
    fi
    decision=retry ;;
esac
echo "[$(date -u +%FT%TZ)] cpt_3b_control_accounting: exit $code ($decision), requeueing job $SLURM_JOB_ID"
record "$decision" ""  # first: a granted requeue ends this script
if ! scontrol requeue "$SLURM_JOB_ID"; then
  record failed "scontrol requeue refused"
  echo "cpt_3b_control_accounting: SLURM refused to requeue job $SLURM_JOB_ID; not done" >&2
  exit 1
fi
exit 0
