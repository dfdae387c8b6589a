"""``launch status``: one row per cell from SLURM (when it still knows the job) and the run
folder (which always does): state, progress, last checkpoint, last loss, requeues, evals."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from megatron_cpt import run_folder as rf
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
    run = rf.RunFolder(run_dir)
    records = run.metrics()
    trains = [r for r in records if r.get("kind") == "train"]
    last = trains[-1] if trains else None
    resumes = sum(r.get("event") == "resume" for r in records)
    budget = ((run.run_info() or {}).get("budget") or {}).get("iterations")
    return {"iteration": last["iteration"] if last else 0, "iterations": budget,
            "tokens": last["tokens"] if last else 0.0, "loss": last["loss"] if last else None,
            "checkpoint": run.latest_name(), "resumes": resumes, "exit": run.exit_status(),
            "evals": len(run.eval_results())}


def _state(slurm: dict, progress: dict, launched: bool) -> str:
    if slurm.get("JobState"):
        return slurm["JobState"]
    exit_status = progress["exit"]
    if exit_status:
        return rf.exit_state(exit_status.get("code"))
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
