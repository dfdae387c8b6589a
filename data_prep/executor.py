"""Running per-unit work through datatrove's Local or SLURM pipeline executors.

Each work unit (see ``data_prep.io.plan_units``) is one datatrove *task*: task ``rank``
processes ``units[rank]`` and writes its shard under ``work_dir``. A final single-task step
(the merge) runs in this process for the local executor, or as a dependent SLURM job.
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import os
import sys

from megatron_cpt.config_ranges import ranged
from megatron_cpt.errors import UsageError

try:  # datatrove is a hard dependency, but keep the import error readable
    from datatrove.pipeline.base import PipelineStep
except ImportError as exc:  # pragma: no cover
    raise UsageError("datatrove is not installed: pip install datatrove") from exc


class UnitStep(PipelineStep):
    """A datatrove step that processes ``self.units[rank]`` (subclasses implement ``process``)."""

    name = "unit"
    type = "megatron-cpt"

    def __init__(self, units: list, work_dir: str):
        super().__init__()
        self.units = units
        self.work_dir = work_dir

    def shard_path(self, rank: int) -> str:
        return os.path.join(self.work_dir, "shards", f"{rank:05d}")

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if world_size != len(self.units):
            raise RuntimeError(f"executor has {world_size} tasks but there are {len(self.units)} units")
        os.makedirs(os.path.join(self.work_dir, "shards"), exist_ok=True)
        self.process(self.units[rank], rank)
        return None

    @abc.abstractmethod
    def process(self, unit, rank: int) -> None:
        """Process one work unit, writing into ``shard_path(rank)``."""


class CallableStep(PipelineStep):
    """Runs ``fn()`` once (used for the merge step of a SLURM pipeline)."""

    name = "merge"
    type = "megatron-cpt"

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        self.fn()
        return None


@dataclasses.dataclass
class ExecutorConfig:
    kind: str = "local"  # local | slurm
    workers: int = ranged(1, -1)  # local: parallel processes; slurm: max concurrent array tasks (-1: no limit)
    # SLURM only
    partition: str = "cpu"
    time: str = "04:00:00"
    cpus_per_task: int = ranged(2, 1)
    mem_per_cpu_gb: int = ranged(2, 1)
    venv_path: str | None = None
    sbatch_args: dict | None = None

    def __post_init__(self):
        if self.kind == "slurm" and not self.venv_path:
            self.venv_path = venv_activate()
        if self.kind not in ("local", "slurm"):
            raise UsageError(f"executor {self.kind!r} is unknown: use local or slurm")
        if self.workers == 0 or self.workers < -1:
            raise UsageError(f"workers={self.workers} is invalid: use a positive number")


def run_units(step: UnitStep, n_tasks: int, cfg: ExecutorConfig, logging_dir: str, merge_fn=None):
    """Run ``step`` for every unit, then ``merge_fn`` (locally, or as a dependent SLURM job).

    Returns True when the merge already ran (local), False when it was submitted (SLURM).
    """
    if cfg.kind == "local":
        workers = max(1, min(cfg.workers, n_tasks))
        ex = _QuietLocalExecutor(pipeline=[step], tasks=n_tasks, workers=workers,
                                   logging_dir=logging_dir, skip_completed=False,
                                   start_method="fork" if workers > 1 else "forkserver")
        with _quiet_datatrove():
            ex.run()
            if merge_fn is not None:
                merge_fn()
        return True
    from datatrove.executor import SlurmPipelineExecutor

    common = dict(time=cfg.time, partition=cfg.partition, cpus_per_task=cfg.cpus_per_task,
                  mem_per_cpu_gb=cfg.mem_per_cpu_gb, venv_path=cfg.venv_path,
                  sbatch_args=cfg.sbatch_args, skip_completed=True)
    stage1 = SlurmPipelineExecutor(pipeline=[step], tasks=n_tasks, workers=cfg.workers,
                                   logging_dir=os.path.join(logging_dir, "tasks"),
                                   job_name="mcpt_prep", **common)
    if merge_fn is None:
        stage1.run()
        return False
    stage2 = SlurmPipelineExecutor(pipeline=[CallableStep(merge_fn)], tasks=1, workers=1,
                                   logging_dir=os.path.join(logging_dir, "merge"),
                                   job_name="mcpt_prep_merge", depends=stage1, **common)
    stage2.run()  # launches stage1 first, then the merge with an afterok dependency
    return False


from datatrove.executor import LocalPipelineExecutor  # noqa: E402


class _QuietLocalExecutor(LocalPipelineExecutor):
    """datatrove prints every task's INFO log to stderr; keep errors only there
    (the full task logs stay under the logging folder). MCPT_PREP_VERBOSE=1 restores them."""

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        if not os.environ.get("MCPT_PREP_VERBOSE"):
            local_rank = max(local_rank, 1)  # datatrove: local_rank != 0 logs ERROR only to stderr
        try:
            return super()._run_for_rank(rank, local_rank, node_rank)
        finally:
            if not os.environ.get("MCPT_PREP_VERBOSE"):
                _stderr_sink("WARNING")  # datatrove re-adds an INFO stderr sink after each task


@contextlib.contextmanager
def _quiet_datatrove():
    """During a local run the executor logs progress at INFO in this process: keep warnings
    only. Scoped: afterwards loguru is back to one default stderr sink, the state datatrove's
    own ``close_task_logger`` leaves too."""
    if os.environ.get("MCPT_PREP_VERBOSE"):
        yield
        return
    _stderr_sink("WARNING")
    try:
        yield
    finally:
        _stderr_sink("DEBUG")  # loguru's default


def _stderr_sink(level: str) -> None:
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level=level)


def venv_activate() -> str | None:
    """The activate script of the running venv (SLURM jobs source it), if any."""
    for root in (os.environ.get("VIRTUAL_ENV"), sys.prefix):
        if root and os.path.isfile(os.path.join(root, "bin", "activate")):
            return os.path.join(root, "bin", "activate")
    return None
