"""``launch status``: one row per cell from SLURM (when it still knows the job) and the run
folder (which always does): state, progress, last checkpoint, last loss, requeues, crashes
and their retries (``RUN/launches.jsonl``), evals."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from megatron_cpt import run_folder as rf
from megatron_cpt.launch.study import Cell, StudyConfig


UNKNOWN = "UNKNOWN"  # SLURM did not answer: the job may still be running


def slurm_job(job_id: str | None) -> dict:
    """``scontrol show job`` fields (JobState, Restarts, ...); {} when SLURM answers that it
    no longer knows the job (finished longer than MinJobAge ago); ``JobState=UNKNOWN`` with
    the error as ``Reason`` when scontrol itself fails (controller down, timeout, no SLURM
    here): a job we cannot see is not a job that is gone."""
    if not job_id:
        return {}
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"JobState": UNKNOWN, "Reason": f"scontrol failed: {exc}"}
    if out.returncode:
        if "Invalid job id" in out.stderr:
            return {}
        lines = out.stderr.strip().splitlines() or [f"scontrol exited {out.returncode}"]
        return {"JobState": UNKNOWN, "Reason": lines[-1]}
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
            "evals": len(run.eval_results()), "health": rank_health(records, last),
            **launch_history(run)}


def launch_history(run: rf.RunFolder) -> dict:
    """Crashes and hangs (launches that ended other than 0/2/3/42), how many were retried, the last
    launch's outcome, from ``RUN/launches.jsonl``."""
    history = run.launches()
    last = history[-1] if history else {}
    calm = (rf.EXIT_OK, rf.EXIT_REQUEUE, *rf.NEVER_RETRIED)  # a crash or hang is anything else
    return {"failures": sum(r.get("code") not in calm for r in history),
            "retries": sum(r.get("decision") == rf.RETRY for r in history),
            "last_launch": (f"{last['reason']}->{last['decision']}" if last else None),
            "last_note": last.get("note") or None}


def rank_health(records: list[dict], last: dict | None) -> dict:
    """The latest per-rank figures (training/health.py) and the straggler events."""
    keys = ("slowest_rank", "rank_time_max_s", "fastest_rank", "rank_time_min_s", "peak_mem_gb")
    out = {k: (last or {}).get(k) for k in keys}
    stragglers = [r for r in records if r.get("event") == "straggler"]
    out["stragglers"] = len(stragglers)
    out["last_straggler"] = stragglers[-1].get("rank") if stragglers else None
    return out


def format_health(h: dict) -> str:
    """``slow r1 540ms fast r0 37ms mem 0.40G stragglers 2 (r1)``; ``-`` before any figure."""
    if h.get("rank_time_max_s") is None:
        return "-"
    text = (f"slow r{h['slowest_rank']} {h['rank_time_max_s'] * 1000:.0f}ms "
            f"fast r{h['fastest_rank']} {h['rank_time_min_s'] * 1000:.0f}ms "
            f"mem {h['peak_mem_gb']:.2f}G")
    if h.get("stragglers"):
        text += f" stragglers {h['stragglers']} (r{h['last_straggler']})"
    return text


def _state(slurm: dict, progress: dict, launched: bool) -> str:
    if slurm.get("JobState"):
        return slurm["JobState"]
    exit_status = progress["exit"]
    if exit_status and exit_status.get("code") == rf.EXIT_NONFINITE:
        return rf.exit_state(rf.EXIT_NONFINITE)
    if (progress["last_launch"] or "").endswith((rf.FAILED, rf.GIVE_UP)):
        return "FAILED"  # a crash past max_failures, a refused requeue (launches.jsonl)
    if exit_status and exit_status.get("code") is not None:  # null: a launch left no verdict
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
        local = entry.get("executor") == "local"  # no SLURM job to ask about
        slurm = {} if local else slurm_job(entry.get("train_job"))
        progress = run_progress(cell.run_dir)
        eval_slurm = {} if local else slurm_job(entry.get("eval_job"))
        requeues = max(progress["resumes"], int(slurm.get("Restarts", 0) or 0),
                       int(entry.get("restarts", 0)))
        rows.append({"cell": cell.name, "job": entry.get("train_job"),
                     "state": _state(slurm, progress, bool(entry)),
                     "iteration": progress["iteration"], "iterations": progress["iterations"],
                     "tokens": progress["tokens"], "checkpoint": progress["checkpoint"],
                     "loss": progress["loss"], "requeues": requeues,
                     "failures": progress["failures"], "retries": progress["retries"],
                     "last_launch": progress["last_launch"], "last_note": progress["last_note"],
                     "eval_job": entry.get("eval_job"), "health": progress["health"],
                     "eval_state": eval_slurm.get("JobState") or (
                         f"{progress['evals']} scored" if progress["evals"] else "-")})
    return rows


def format_rows(rows: list[dict]) -> str:
    head = (f"{'cell':<24} {'job':>10} {'state':<12} {'iter':>11} {'tokens':>10} "
            f"{'checkpoint':<16} {'loss':>8} {'requeues':>8} {'crash/retry':>11}  {'eval':<12} health")
    lines = [head]
    for r in rows:
        it = f"{r['iteration']}/{r['iterations'] or '?'}"
        loss = f"{r['loss']:.4f}" if r["loss"] is not None else "-"
        crashes = f"{r['failures']}/{r['retries']}"
        lines.append(f"{r['cell']:<24} {str(r['job'] or '-'):>10} {r['state']:<12} {it:>11} "
                     f"{r['tokens']:>10.3e} {str(r['checkpoint'] or '-'):<16} {loss:>8} "
                     f"{r['requeues']:>8} {crashes:>11}  {r['eval_state']:<12} "
                     f"{format_health(r['health'])}")
    return "\n".join(lines)
