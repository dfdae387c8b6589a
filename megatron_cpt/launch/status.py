"""``launch status``: one row per cell from SLURM (when it still knows the job) and the run
folder (which always does): state, progress, last checkpoint, last loss, requeues, evals."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from megatron_cpt.launch.study import Cell, StudyConfig


def slurm_job(job_id: str | None) -> dict:
    """``scontrol show job`` fields (JobState, Restarts, ...) or {} when SLURM no longer
    knows the job (finished longer than MinJobAge ago, or no SLURM here)."""
    if not job_id:
        return {}
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode:
        return {}
    fields = {}
    for token in out.stdout.split():
        key, _, value = token.partition("=")
        fields.setdefault(key, value)
    return fields


def run_progress(run_dir: Path) -> dict:
    """Iterations, tokens and loss of the last train record; resume events; exit status."""
    last, resumes, budget = None, 0, None
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if rec.get("kind") == "train":
                last = rec
            elif rec.get("event") == "resume":
                resumes += 1
    run_json = run_dir / "run.json"
    if run_json.is_file():
        budget = (json.loads(run_json.read_text()).get("budget") or {}).get("iterations")
    status_file = run_dir / "exit_status.json"
    exit_status = json.loads(status_file.read_text()) if status_file.is_file() else None
    latest = run_dir / "checkpoints" / "latest"
    evals = sorted((run_dir / "eval").glob("[0-9]*[0-9].json")) if (run_dir / "eval").is_dir() else []
    return {"iteration": last["iteration"] if last else 0, "iterations": budget,
            "tokens": last["tokens"] if last else 0.0, "loss": last["loss"] if last else None,
            "checkpoint": latest.read_text().strip() if latest.is_file() else None,
            "resumes": resumes, "exit": exit_status, "evals": len(evals)}


def _state(slurm: dict, progress: dict, launched: bool) -> str:
    if slurm.get("JobState"):
        return slurm["JobState"]
    exit_status = progress["exit"]
    if exit_status:
        return {0: "DONE", 3: "NONFINITE", 42: "STOPPED"}.get(exit_status["code"], "FAILED")
    if progress["iteration"]:
        return "INCOMPLETE"
    return "SUBMITTED" if launched else "NOT LAUNCHED"


def status_rows(study: StudyConfig, cells: list[Cell]) -> list[dict]:
    launches_path = study.study_dir / "launches.json"
    launches = json.loads(launches_path.read_text()) if launches_path.is_file() else {}
    rows = []
    for cell in cells:
        entry = launches.get(cell.name, {})
        slurm = slurm_job(entry.get("train_job"))
        progress = run_progress(cell.run_dir)
        eval_slurm = slurm_job(entry.get("eval_job"))
        requeues = max(progress["resumes"], int(slurm.get("Restarts", 0) or 0),
                       int(entry.get("restarts", 0)))
        rows.append({"cell": cell.name, "job": entry.get("train_job"),
                     "state": _state(slurm, progress, bool(entry)),
                     "iteration": progress["iteration"], "iterations": progress["iterations"],
                     "tokens": progress["tokens"], "checkpoint": progress["checkpoint"],
                     "loss": progress["loss"], "requeues": requeues,
                     "eval_job": entry.get("eval_job"),
                     "eval_state": eval_slurm.get("JobState") or (
                         f"{progress['evals']} scored" if progress["evals"] else "-")})
    return rows


def format_rows(rows: list[dict]) -> str:
    head = (f"{'cell':<24} {'job':>10} {'state':<12} {'iter':>11} {'tokens':>10} "
            f"{'checkpoint':<16} {'loss':>8} {'requeues':>8}  eval")
    lines = [head]
    for r in rows:
        it = f"{r['iteration']}/{r['iterations'] or '?'}"
        loss = f"{r['loss']:.4f}" if r["loss"] is not None else "-"
        lines.append(f"{r['cell']:<24} {str(r['job'] or '-'):>10} {r['state']:<12} {it:>11} "
                     f"{r['tokens']:>10.3e} {str(r['checkpoint'] or '-'):<16} {loss:>8} "
                     f"{r['requeues']:>8}  {r['eval_state']}")
    return "\n".join(lines)
