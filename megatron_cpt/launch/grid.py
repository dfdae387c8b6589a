"""Submit the study grid through submitit: one job array per model size (one resource
spec each, one element per corpus), each cell's evaluation chained ``afterok`` on its
training element.

Requeue: the trainer owns the signals (SIGUSR1/USR2/TERM -> every rank saves one checkpoint
together and exits with ``run_folder.EXIT_REQUEUE``). :class:`TrainCell` turns that, and a
crash within ``resources.max_failures``, into ``scontrol requeue`` of the same job id, so the run folder, the array element and the
``afterok`` dependency of its evaluation all stay valid; the requeued job runs the same pickled
callable and resumes the latest checkpoint. :meth:`TrainCell.checkpoint` covers submitit's own
USR2 handler (a signal that arrives before or after the trainer's handlers are installed) by
resubmitting the same cell.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_cpt import run_folder as rf
from megatron_cpt.errors import UsageError
from megatron_cpt.launch.study import Cell, StudyConfig, check_inputs, check_resources, \
    input_problem, write_study_json
from megatron_cpt.training.signals import parse_slurm_duration


def _minutes(slurm_time: str) -> int:
    seconds = parse_slurm_duration(slurm_time)
    if seconds is None:
        raise UsageError(f"cannot read time limit '{slurm_time}'; use [D-]HH:MM:SS")
    return max(1, int(seconds // 60))


@dataclass
class TrainCell:
    """Picklable job: train one cell with the study's base config plus its overrides."""

    cell: str
    train_config: str
    overrides: list[str]
    threads: int = 1
    max_requeues: int = 20
    max_failures: int = 3

    def __call__(self) -> dict:
        os.environ.setdefault("OMP_NUM_THREADS", str(self.threads))
        import submitit

        # setup_device() picks cuda:LOCAL_RANK itself, so keep every GPU visible
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        from megatron_cpt.runtime import cuda_connections
        from megatron_cpt.training.config import TrainConfig
        from megatron_cpt.training.loop import train

        cfg = TrainConfig.load(self.train_config, self.overrides)
        cuda_connections.apply(cfg.parallel.tp, cfg.parallel.sequence_parallel)  # before CUDA initialises
        try:
            code, crash = train(cfg), ""
        except UsageError:
            raise
        except Exception as exc:  # a collective error after a peer died: retried like a crash
            code, crash = 1, f"{type(exc).__name__}: {exc}"[:200]
        job = submitit.JobEnvironment()
        if job.cluster == "slurm":
            self._requeue_or_fail(code, crash, rf.RunFolder(cfg.run_dir), job)
        return {"cell": self.cell, "exit_code": code, "run_dir": cfg.run_dir}

    def _requeue_or_fail(self, code: int, crash: str, run: rf.RunFolder, job) -> None:
        """Rank 0 records the launch and requeues the same job (42, or a crash within
        ``max_failures``); every rank raises where the cell ends unfinished, so submitit and
        SLURM report failure and ``afterok`` never fires. Returns only when the run is done."""
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        decision = rf.requeue_decision(code, restarts, self.max_requeues,
                                       run.failures(job.job_id), self.max_failures)
        if decision == rf.FINISHED:
            return
        if job.global_rank == 0:
            run.record_launch(rf.launch_record(job.job_id, restarts, code, decision, crash))
        if decision in (rf.FAILED, rf.GIVE_UP):
            raise RuntimeError(f"{self.cell}: trainer exited {code} ({decision}) after {restarts} "
                               f"restarts; see {run.launches_path}")
        if job.global_rank == 0:
            print(f"{self.cell}: exit {code} ({decision}), requeueing job {job.job_id}", flush=True)
            if subprocess.run(["scontrol", "requeue", job.job_id], timeout=60).returncode:
                run.record_launch(rf.launch_record(job.job_id, restarts, code, rf.FAILED,
                                                   "scontrol requeue refused"))
                raise RuntimeError(f"{self.cell}: SLURM refused to requeue job {job.job_id}")
        self._wait_for_requeue(run, job.job_id, restarts)

    @staticmethod
    def _wait_for_requeue(run: rf.RunFolder, job_id: str, restarts: int) -> None:
        """SLURM now stops this job and starts it again (returning would record a result);
        other ranks leave with an error when rank 0 records that the requeue was refused."""
        for _ in range(3600):
            if any(r.get("job") == str(job_id) and r.get("restart") == restarts
                   and r.get("decision") == rf.FAILED for r in run.launches()):
                raise RuntimeError(f"job {job_id}: SLURM refused the requeue (see rank 0)")
            time.sleep(1)
        raise RuntimeError(f"job {job_id} was not requeued within an hour")

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(self)


@dataclass
class EvalCell:
    """Picklable job: score the base model and every checkpoint of one run (`eval run`)."""

    cell: str
    run_dir: str
    exams: list[str] = field(default_factory=list)
    num_fewshot: int = 5
    batch_size: int = 16
    limit: int | None = None
    valid_sequences: int = 16
    threads: int = 1

    def argv(self) -> list[str]:
        argv = ["eval", "run", "--run-dir", self.run_dir, "--num-fewshot", str(self.num_fewshot),
                "--batch-size", str(self.batch_size), "--valid-sequences", str(self.valid_sequences)]
        if self.exams:
            argv += ["--exams", *self.exams]
        if self.limit:
            argv += ["--limit", str(self.limit)]
        return argv

    def __call__(self) -> dict:
        os.environ.setdefault("OMP_NUM_THREADS", str(self.threads))
        from megatron_cpt.cli import main

        code = main(self.argv())
        if code:
            raise RuntimeError(f"{self.cell}: evaluation exited {code}")
        return {"cell": self.cell, "exit_code": 0}

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(self)  # scored checkpoints are skipped


def train_job(cell: Cell) -> TrainCell:
    return TrainCell(cell.name, str(cell.study.train_config), cell.trainer_overrides(),
                     threads=cell.study.resources.cpus_per_task,
                     max_requeues=cell.study.resources.max_requeues,
                     max_failures=cell.study.resources.max_failures)


GENERAL_EXAM = "general"  # the general benchmark's exam name (report.load.GENERAL)


def eval_job(cell: Cell) -> EvalCell:
    ev = cell.study.eval
    return EvalCell(cell.name, str(cell.run_dir), cell_exams(cell), ev.num_fewshot,
                    ev.batch_size, ev.limit, ev.valid_sequences, threads=ev.cpus)


def cell_exams(cell: Cell) -> list[str]:
    """The exams the report reads for this cell: all for the general run (every domain's SGER
    refers to it), else the cell's domain exam and the general benchmark (forgetting). A legal
    run is never compared on the medical exam, so it is not scored there."""
    exams = [str(e) for e in cell.study.eval.exams]
    if cell.domain is None:
        return exams
    return [e for e in exams if Path(e).stem in (cell.domain, GENERAL_EXAM)] or exams


def cost_rows(cells: list[Cell], mfu: float = 0.40, peak_tflops: float = 989.0) -> list[dict]:
    """Cells with resources, tokens, FLOPs, GPU-hours and ``inputs`` (the input checks a real
    launch runs: None when ready, else what is missing), memory per GPU, checkpoint storage
    and corpus epochs (``launch.capacity``) (``plan --study`` and ``--dry-run``)."""
    from megatron_cpt.launch.capacity import capacity_row
    from megatron_cpt.models.qwen2 import ModelConfig
    from megatron_cpt.training.budget import cost_estimate

    rows = []
    for cell in cells:
        check_resources(cell)
        cfg = cell.train_config()
        row = cost_estimate(cfg, ModelConfig.load(cell.size.model), cell.gpus or cell.world_size,
                            mfu, peak_tflops)
        rows.append({**cell.describe(), "time": cell.size.time, "inputs": input_problem(cell), **{
            k: row[k] for k in ("params", "tokens", "flops", "iterations", "gpu_hours", "wall_hours")},
            **capacity_row(cell, row["tokens"])})
    return rows


def _executor(study: StudyConfig, kind: str, folder: Path, name: str, *, nodes: int, tasks: int,
              gpus: int, cpus: int, time_str: str, mem: str | None, signal_s: int,
              dependency: str | None = None):
    import submitit

    res = study.resources
    ex = submitit.AutoExecutor(folder=folder, cluster=kind)
    params = dict(name=name, nodes=nodes, tasks_per_node=tasks, cpus_per_task=cpus,
                  timeout_min=_minutes(time_str), stderr_to_stdout=True)
    if gpus:
        params["gpus_per_node"] = gpus
    if kind == "slurm":
        extra = {"requeue": True, "open_mode": "append"}
        if dependency:
            extra["dependency"] = dependency
        if mem is not None:
            extra["mem"] = mem
        params.update(slurm_signal_delay_s=signal_s, slurm_additional_parameters=extra)
        # SBATCH_PARTITION / _ACCOUNT / _QOS in the environment are read by sbatch itself
        for key, value in (("slurm_partition", res.partition), ("slurm_account", res.account),
                           ("slurm_qos", res.qos)):
            if value:
                params[key] = value
    ex.update_parameters(**params)
    return ex


def _eval_executor(study: StudyConfig, kind: str, size: str, dependency: str | None = None):
    """One task on one GPU (or CPU) for `eval run`, optionally after a training job."""
    ev, res = study.eval, study.resources
    gpus = min(ev.gpus, res.gpus_per_node) if kind == "slurm" else 0
    return _executor(study, kind, study.study_dir / "submitit" / size, f"eval_{size}", nodes=1,
                     tasks=1, gpus=gpus, cpus=ev.cpus, time_str=ev.time, mem=ev.mem or res.mem,
                     signal_s=60, dependency=dependency)


# SLURM states of a job that still owns its run folder
ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                 "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT")


def _unscored(cell: Cell) -> int:
    """Checkpoints (and the base model) of a run without an evaluation result yet."""
    from eval.run import scored_points

    run = rf.RunFolder(cell.run_dir)
    return sum(not run.eval_result(p.iteration).is_file() for p in scored_points(run.path))


def _already(cell: Cell, launches: dict) -> str | None:
    """Why a cell must not be submitted again: its job is still queued or running (two jobs
    on one run folder would corrupt it), or its run is done."""
    from megatron_cpt.launch.status import slurm_job

    from megatron_cpt.launch.status import UNKNOWN

    entry = launches.get(cell.name) or {}
    job_id = entry.get("train_job")
    job = {} if entry.get("executor") == "local" else slurm_job(job_id)
    state = job.get("JobState", "")
    if state in ACTIVE_STATES:
        return f"job {job_id} is {state}"
    if state == UNKNOWN:
        return (f"state of job {job_id} unknown ({job['Reason']}); a second job on its run "
                "folder would be refused by its lease, rerun when SLURM answers")
    exit_status = rf.RunFolder(cell.run_dir).exit_status()
    if exit_status and exit_status.get("code") == rf.EXIT_OK:
        return "done"
    return None


def submit_grid(study: StudyConfig, cells: list[Cell], kind: str = "slurm",
                evaluate: bool = True, log=print) -> dict:
    """Check every cell, then submit. ``kind``: slurm (arrays + afterok, returns at once) or
    local (cells trained one after another on this machine, requeued in place, each cell's
    evaluation running beside the next cell's training; returns when all are done).
    Rerunning it submits only what is missing: cells whose job is still queued or running are
    left alone, finished cells only get an evaluation job when checkpoints are unscored."""
    from megatron_cpt.launch.capacity import check_memory

    for cell in cells:
        check_resources(cell)
        check_memory(cell)
        check_inputs(cell)
    write_study_json(study, cells)
    launches_path = study.study_dir / "launches.json"
    launches = json.loads(launches_path.read_text()) if launches_path.is_file() else {}
    evaluate = evaluate and study.eval.enabled
    by_size: dict[str, list[Cell]] = {}
    evaluations: list = []  # local evaluation jobs still running
    for cell in cells:
        reason = _already(cell, launches)
        if reason is None:
            by_size.setdefault(cell.size.name, []).append(cell)
            continue
        log(f"{cell.name:<24} not submitted: {reason}")
        if reason == "done" and evaluate and _unscored(cell):
            job = _eval_executor(study, kind, cell.size.name).submit(eval_job(cell))
            launches.setdefault(cell.name, {})["eval_job"] = job.job_id
            log(f"{cell.name:<24} eval job {job.job_id} (unscored checkpoints)")
            if kind == "local":
                job.result()
    for size, group in by_size.items():
        spec = group[0].size
        folder = study.study_dir / "submitit" / size
        train_ex = _executor(study, kind, folder, f"cpt_{size}", nodes=spec.nodes,
                             tasks=group[0].tasks_per_node, gpus=study.resources.gpus_per_node,
                             cpus=study.resources.cpus_per_task, time_str=spec.time,
                             mem=study.resources.mem, signal_s=spec.signal_s)
        if kind == "local":
            for cell in group:
                evaluations += _run_local(study, cell, train_ex, evaluate, launches, log)
            continue
        with train_ex.batch():
            jobs = [train_ex.submit(train_job(cell)) for cell in group]
        for cell, job in zip(group, jobs):
            entry = {"train_job": job.job_id, "submitted": time.time(), "executor": kind}
            if evaluate:
                eval_ex = _eval_executor(study, kind, size, dependency=f"afterok:{job.job_id}")
                entry["eval_job"] = eval_ex.submit(eval_job(cell)).job_id
            launches[cell.name] = entry
            log(f"{cell.name:<24} train job {entry['train_job']}"
                + (f", eval job {entry['eval_job']} (afterok)" if evaluate else ""))
    for cell, job in evaluations:
        job.result()
        log(f"{cell.name:<24} evaluated (local job {job.job_id})")
    launches_path.write_text(json.dumps(launches, indent=2) + "\n")
    return launches


def _run_local(study, cell, train_ex, evaluate, launches, log) -> list:
    """Without SLURM: run the cell, start it again in place while :func:`run_folder.
    requeue_decision` says so (42, or a crash within ``max_failures``), then start its
    evaluation and return ``[(cell, job)]`` without waiting: the caller trains the next cell
    meanwhile (the evaluation is one process, training leaves CPU to spare) and waits at the
    end."""
    res, run = study.resources, rf.RunFolder(cell.run_dir)
    restarts = failures = 0
    while True:
        job = train_ex.submit(train_job(cell))
        log(f"{cell.name:<24} local job {job.job_id} (restart {restarts})")
        try:
            code = job.results()[0]["exit_code"]  # one result per task; rank 0's speaks for all
        except Exception:  # noqa: BLE001  a crashed task (submitit re-raises its error)
            code = 1
        decision = rf.requeue_decision(code, restarts, res.max_requeues, failures,
                                       res.max_failures)
        run.record_launch(rf.launch_record(f"local-{job.job_id}", restarts, code, decision))
        if decision == rf.FINISHED:
            break
        if decision not in (rf.REQUEUE, rf.RETRY):
            raise RuntimeError(f"{cell.name}: trainer exited {code} ({decision}) after "
                               f"{restarts} restarts; see {run.launches_path}")
        failures += decision == rf.RETRY
        restarts += 1
    launches[cell.name] = {"train_job": job.job_id, "executor": "local", "restarts": restarts,
                           "failures": failures, "finished": time.time()}
    if not evaluate:
        return []
    job = _eval_executor(study, "local", cell.size.name).submit(eval_job(cell))
    launches[cell.name]["eval_job"] = job.job_id
    log(f"{cell.name:<24} evaluating (local job {job.job_id})")
    return [(cell, job)]
