"""The run folder: the one owner of what a training run leaves on disk.

Layout of ``RUN/`` (every reader and writer goes through :class:`RunFolder`)::

    config.yaml              the resolved training config (``TrainConfig.to_dict()``)
    run.json                 config hash, world size, DP, budget, code provenance, placement
                             (each rank's host and node) (every start)
    metrics.jsonl            append-only log of train / valid / event records (rank 0)
    exit_status.json         the trainer's verdict: {code, iteration, iterations, reason};
                             code null / reason "running" from launch start to the verdict
    lease.json               the one writer: host, job, pid, heartbeat (training/lease.py)
    launches.jsonl           one line per launch that ended: job, restart, code, reason,
                             decision (finished/requeue/retry/failed/give_up), note (launchers)
    checkpoints/iter_N/      committed checkpoints (written by training/checkpointing/)
    checkpoints/latest       name of the checkpoint resume trusts
    eval/<iteration>.json    evaluation result of one scored point (``eval run``)
    eval/tasks/              the lm-eval task YAMLs of the run
    debug/                   sample-id logs (``logging.log_sample_ids``)
    data_blend.json          samples per training prefix over the budget (blends of 2+ prefixes)
    hang/rank_NNNNN.txt      each rank's stacks and last collective when the hang watchdog fired
    tensorboard/             TensorBoard events (``logging.tensorboard``)
    data_cache/              Megatron dataset index cache (unless ``data.cache_dir`` is set)

It also owns the trainer's exit codes, the requeue decision (Python here, and the same rule
rendered into the sbatch scripts) and the MASTER_PORT formula. Ground floor: it imports only
:mod:`megatron_cpt.errors`, the standard library and yaml.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from megatron_cpt.errors import UsageError

CONFIG = "config.yaml"
RUN_JSON = "run.json"
METRICS = "metrics.jsonl"
EXIT_STATUS = "exit_status.json"
LEASE = "lease.json"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
EVAL_DIR = "eval"
DEBUG_DIR = "debug"
DATA_BLEND = "data_blend.json"
HANG_DIR = "hang"


# -- exit codes ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExitCode:
    code: int
    reason: str   # written to exit_status.json
    state: str    # shown by `launch status` once SLURM has forgotten the job
    meaning: str


EXIT_OK, EXIT_NONFINITE, EXIT_HANG, EXIT_LEASE_LOST, EXIT_REQUEUE = 0, 3, 4, 5, 42
EXIT_CODES = {e.code: e for e in (
    ExitCode(EXIT_OK, "done", "DONE", "budget spent, final checkpoint written"),
    ExitCode(UsageError.exit_code, "usage", "FAILED",
             "configuration / input error (one-line message), nothing started"),
    ExitCode(EXIT_NONFINITE, "nonfinite", "NONFINITE",
             "NaN/Inf loss: checkpoint of the last good step written; do not requeue"),
    ExitCode(EXIT_HANG, "hang", "HUNG",
             "no step or save completed within train.hang_timeout_min: every rank's stacks in "
             "hang/; retried like a crash"),
    ExitCode(EXIT_LEASE_LOST, "lease_lost", "SUPERSEDED",
             "another launch took over the run folder (this one froze past the lease's "
             "staleness); stopped without committing: do not requeue"),
    ExitCode(EXIT_REQUEUE, "requeue", "STOPPED",
             "stopped early (signal, walltime, stop_after_iterations), checkpoint written: "
             "requeue the same command"),
)}


def exit_state(code: int | None) -> str:
    """The `launch status` state of a finished launch (FAILED for codes the trainer never uses)."""
    entry = EXIT_CODES.get(code)
    return entry.state if entry else "FAILED"


# -- the requeue decision --------------------------------------------------------------------
REQUEUE, RETRY, FINISHED, FAILED, GIVE_UP = "requeue", "retry", "finished", "failed", "give_up"
# the same input fails the same way again; a superseded launch has a successor that owns the run
NEVER_RETRIED = (UsageError.exit_code, EXIT_NONFINITE, EXIT_LEASE_LOST)
LAUNCHES = "launches.jsonl"


def requeue_decision(code: int, restarts: int, max_requeues: int, failures: int = 0,
                     max_failures: int = 0) -> str:
    """What a launcher does with the trainer's exit ``code``: finished (0); requeue the same job
    (42, while ``restarts < max_requeues``); retry it after a crash (any other code but 2 and 3:
    a killed rank, a collective error, a lost node; while ``failures < max_failures``, counting
    earlier crashes of this job); give_up (42 too often: the cell is broken, not unlucky);
    failed (bad input, non-finite loss, crashes past ``max_failures``). Used by TrainCell and
    the local executor; :func:`requeue_shell` renders the same rule for the sbatch scripts."""
    if code == EXIT_OK:
        return FINISHED
    if code in NEVER_RETRIED:
        return FAILED
    if code == EXIT_REQUEUE:
        return REQUEUE if restarts < max_requeues else GIVE_UP
    return RETRY if failures < max_failures else FAILED


def launch_record(job: str, restart: int, code: int, decision: str, note: str = "") -> dict:
    """One line of ``RUN/launches.jsonl``: how one launch of the run ended and what followed."""
    import time

    entry = EXIT_CODES.get(code)
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "job": str(job),
            "restart": restart, "code": code, "reason": entry.reason if entry else "crash",
            "decision": decision, "note": note}


def requeue_shell(job: str) -> str:
    """:func:`requeue_decision` in bash for the sbatch template. Reads ``$code`` (the trainer's
    verdict), ``$SLURM_RESTART_COUNT``, ``$MAX_REQUEUES`` and ``$MAX_FAILURES``; appends the
    outcome to ``$RUN_DIR/launches.jsonl``, then requeues the job or exits with a code that
    SLURM records as failed unless the run is done (so ``afterok`` fires only then)."""
    never = "|".join(str(c) for c in NEVER_RETRIED)
    return "\n".join([
        f'HISTORY="$RUN_DIR/{LAUNCHES}"',
        "record() {  # decision, note: one JSON line per launch",
        '  local reason; case "$code" in',
        *[f'    {c}) reason="{e.reason}" ;;' for c, e in EXIT_CODES.items()],
        '    *) reason="crash" ;;',
        "  esac",
        '  mkdir -p "$RUN_DIR"',
        "  printf '{\"time\": \"%s\", \"job\": \"%s\", \"restart\": %s, \"code\": %s, "
        "\"reason\": \"%s\", \"decision\": \"%s\", \"note\": \"%s\"}\\n' "
        '"$(date -u +%FT%TZ)" "$SLURM_JOB_ID" "${SLURM_RESTART_COUNT:-0}" "$code" "$reason" '
        '"$1" "$2" >> "$HISTORY"',
        "}",
        r'''failures="$(grep -F "\"job\": \"$SLURM_JOB_ID\"" "$HISTORY" 2>/dev/null '''
        r'''| grep -c '"decision": "retry"')"''',
        'failures="${failures:-0}"',
        'case "$code" in',
        f'  {EXIT_OK}) record {FINISHED} ""; exit 0 ;;',
        f'  {never}) record {FAILED} "not retried"; exit "$code" ;;',
        f'  {EXIT_REQUEUE})',
        '    if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then',
        f'      record {GIVE_UP} "stopped early again after $MAX_REQUEUES requeues"',
        f'      echo "{job}: stopped early again after $MAX_REQUEUES requeues; not requeueing '
        f'(see $RUN_DIR/{METRICS})" >&2',
        "      exit 1",
        "    fi",
        f'    decision={REQUEUE} ;;',
        '  *)',
        '    if [ "$failures" -ge "$MAX_FAILURES" ]; then',
        f'      record {FAILED} "crash after $failures retries (max_failures $MAX_FAILURES)"',
        f'      echo "{job}: exit $code after $failures retries; max_failures reached" >&2',
        '      exit "$code"',
        "    fi",
        f'    decision={RETRY} ;;',
        "esac",
        f'echo "[$(date -u +%FT%TZ)] {job}: exit $code ($decision), requeueing job $SLURM_JOB_ID"',
        'record "$decision" ""  # first: a granted requeue ends this script',
        'if ! scontrol requeue "$SLURM_JOB_ID"; then',
        f'  record {FAILED} "scontrol requeue refused"',
        f'  echo "{job}: SLURM refused to requeue job $SLURM_JOB_ID; not done" >&2',
        "  exit 1",
        "fi",
        "exit 0",
    ])


# -- the rendezvous port ---------------------------------------------------------------------
PORT_BASE, PORT_SPAN = 20000, 20000


def master_port(job_id: int) -> int:
    """MASTER_PORT of a SLURM job: distinct for jobs sharing a node, same on every rank."""
    return PORT_BASE + job_id % PORT_SPAN


MASTER_PORT_SHELL = f"$(({PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN}))"


# -- files -----------------------------------------------------------------------------------
def write_json_atomic(path: Path, data: Any, indent: int | None = None) -> None:
    """Write, then rename: a reader never sees half a file, a kill leaves the old one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class RunFolder:
    """Typed access to one run folder; creates nothing until a writer is called."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # paths
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def run_json(self) -> Path:
        return self.path / RUN_JSON

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def exit_status_path(self) -> Path:
        return self.path / EXIT_STATUS

    @property
    def lease_path(self) -> Path:
        return self.path / LEASE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def latest_pointer(self) -> Path:
        return self.checkpoints / LATEST

    @property
    def eval_dir(self) -> Path:
        return self.path / EVAL_DIR

    @property
    def tasks_dir(self) -> Path:
        return self.eval_dir / "tasks"

    @property
    def data_blend_path(self) -> Path:
        """Samples drawn from each training prefix over the budget (blends of 2+ prefixes)."""
        return self.path / DATA_BLEND

    @property
    def debug_dir(self) -> Path:
        return self.path / DEBUG_DIR

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tensorboard"

    @property
    def data_cache(self) -> Path:
        return self.path / "data_cache"

    @property
    def hang_dir(self) -> Path:
        return self.path / HANG_DIR

    def hang_report(self, rank: int) -> Path:
        return self.hang_dir / f"rank_{rank:05d}.txt"

    def sample_ids_path(self, dp_rank: int) -> Path:
        return self.debug_dir / f"samples_dp{dp_rank}.jsonl"

    def eval_result(self, iteration: int) -> Path:
        return self.eval_dir / f"{iteration:07d}.json"

    def eval_questions(self, iteration: int) -> Path:
        return self.eval_dir / f"{iteration:07d}.questions.jsonl"

    # config.yaml
    def write_config(self, config: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def config_dict(self) -> dict:
        """The run's config as written; UsageError when this is not a run folder."""
        if not self.config_path.is_file():
            raise UsageError(f"{self.path} is not a training run folder (no {CONFIG}); pass the "
                             "run_dir of a `megatron-cpt train` run")
        return yaml.safe_load(self.config_path.read_text()) or {}

    def train_config(self):
        """The run's config typed as ``TrainConfig`` (its defaults fill keys an older run lacks)."""
        from megatron_cpt.training.config import TrainConfig  # the schema: ground, imported lazily

        raw = self.config_dict()
        if "eval" in raw and "validation" not in raw:  # written before the rename
            raw["validation"] = raw.pop("eval")
        return TrainConfig.from_dict(raw)

    # run.json
    def write_run_info(self, info: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.run_json, info, indent=2)

    def run_info(self) -> dict | None:
        return _read_json(self.run_json)

    # exit_status.json
    def write_exit_status(self, code: int, iteration: int, iterations: int) -> None:
        write_json_atomic(self.exit_status_path, {"code": code, "iteration": iteration,
                                                  "iterations": iterations,
                                                  "reason": EXIT_CODES[code].reason})

    def write_running(self, iteration: int, iterations: int) -> None:
        """At launch start: a launcher never reads the previous launch's verdict as this one's."""
        write_json_atomic(self.exit_status_path, {"code": None, "iteration": iteration,
                                                  "iterations": iterations, "reason": "running"})

    def write_refused(self, message: str) -> None:
        """A launch refused before it started (exit 2): replaces a stale verdict, if there is
        one, and creates nothing else."""
        old = self.exit_status()
        if old is None:
            return
        write_json_atomic(self.exit_status_path, {
            "code": UsageError.exit_code, "iteration": old.get("iteration"),
            "iterations": old.get("iterations"), "reason": EXIT_CODES[UsageError.exit_code].reason,
            "message": message})

    def write_crashed(self, code: int, message: str) -> None:
        """A launch that ended by an exception after it started: the code it exits with (1, or
        2 for a refusal found mid-launch) and the exception's one line, so that no launcher
        or ``launch status`` reads "running" from a dead run."""
        old = self.exit_status() or {}
        entry = EXIT_CODES.get(code)
        write_json_atomic(self.exit_status_path, {
            "code": code, "iteration": old.get("iteration"), "iterations": old.get("iterations"),
            "reason": entry.reason if entry else "crash", "message": message})

    def exit_status(self) -> dict | None:
        return _read_json(self.exit_status_path)

    def clear_exit_status(self) -> None:
        self.exit_status_path.unlink(missing_ok=True)

    # metrics.jsonl
    def metrics(self) -> list[dict]:
        """Every record of metrics.jsonl (a line cut by a kill is skipped)."""
        if not self.metrics_path.is_file():
            return []
        records = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    # checkpoints/latest (written by training/checkpointing/)
    def latest_name(self) -> str | None:
        """The checkpoint folder name ``latest`` points at, or None before the first save."""
        if not self.latest_pointer.is_file():
            return None
        return self.latest_pointer.read_text().strip() or None

    # launches.jsonl (appended by launchers: sbatch scripts, TrainCell, the local executor)
    @property
    def launches_path(self) -> Path:
        return self.path / LAUNCHES

    def record_launch(self, record: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with self.launches_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def launches(self) -> list[dict]:
        """Every launch record (a line cut by a kill is skipped)."""
        if not self.launches_path.is_file():
            return []
        out = []
        for line in self.launches_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def failures(self, job: str) -> int:
        """Crashes of SLURM job ``job`` that were retried (counted against max_failures)."""
        return sum(r.get("job") == str(job) and r.get("decision") == RETRY for r in self.launches())

    # eval/
    def eval_results(self) -> dict[int, Path]:
        """iteration (from the file name) -> result file, in order."""
        if not self.eval_dir.is_dir():
            return {}
        found = {int(p.stem): p for p in self.eval_dir.glob("*.json") if p.stem.isdigit()}
        return dict(sorted(found.items()))
