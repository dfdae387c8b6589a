"""Render one self-contained sbatch script per study cell (``slurm/cpt_<size>_<corpus>.sh``).

The scripts are committed so a user can read exactly what runs and submit one cell with
plain ``sbatch``; ``tests/test_slurm.py`` fails when a committed script differs from its
rendering, so configs/ stays the only source. Paths are written relative to the repository
root (``$REPO``, the submission directory by default) and every root can be moved through an
environment variable without editing the script.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from megatron_cpt import run_folder as rf
from megatron_cpt.errors import UsageError
from megatron_cpt.launch.capacity import check_memory
from megatron_cpt.launch.study import REPO_ROOT, Cell, StudyConfig, check_resources
from megatron_cpt.runtime.cuda_connections import shell_export


def script_name(cell: Cell) -> str:
    return f"cpt_{cell.size.name}_{cell.corpus}.sh"


def _in_repo(path: Path) -> str:
    """``$REPO/relative`` for paths inside the repository, else the absolute path."""
    try:
        return "$REPO/" + path.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(path)


def _directives(cell: Cell, job: str) -> list[str]:
    """The job's ``#SBATCH`` options: shape, resources, requeue and the warning signal."""
    size, res = cell.size, cell.study.resources
    directives = [f"--job-name={job}", f"--nodes={size.nodes}",
                  f"--ntasks-per-node={cell.tasks_per_node}"]
    if res.gpus_per_node:
        directives += [f"--gpus-per-node={res.gpus_per_node}", "--exclusive"]
    directives += [f"--cpus-per-task={res.cpus_per_task}"]
    if res.mem is not None:
        directives.append(f"--mem={res.mem}")
    for flag, value in (("partition", res.partition), ("account", res.account), ("qos", res.qos)):
        if value:
            directives.append(f"--{flag}={value}")
    return directives + [f"--time={size.time}", "--requeue", f"--signal=USR1@{size.signal_s}",
                         "--open-mode=append", f"--output=slurm-{job}-%j.out"]


def render(cell: Cell) -> str:
    check_resources(cell)
    check_memory(cell)  # a script for a cell that cannot fit is never written
    study, size, res = cell.study, cell.size, cell.study.resources
    mp = size.tp * size.pp
    dp = cell.world_size // mp
    job = f"cpt_{size.name}_{cell.corpus}"
    what = {"general": "the general corpus", "domain": f"the {cell.domain} corpus",
            "control": f"a random general sample size-matched to {cell.domain} (control)",
            "replay": f"the {cell.domain} corpus with {(cell.general_fraction or 0) * 100:g}% "
                      "general data replayed (weighted blend)"}[cell.kind]
    sbatch_lines = "\n".join(f"#SBATCH {d}" for d in _directives(cell, job))

    overrides = cell.trainer_overrides(run_dir="$RUN_DIR", pretrained=f"$CKPT_ROOT/{size.model}",
                                       data_root="$DATA_ROOT")
    override_lines = " \\\n    ".join(f'"{o}"' for o in overrides)
    layout = f"TP{size.tp} x PP{size.pp} x DP{dp} = {cell.world_size} ranks"
    return f"""#!/bin/bash
# Continued pretraining of {size.model} on {what}: cell {cell.name} of study '{study.name}'.
# {layout} on {size.nodes} node(s){f" of {res.gpus_per_node} GPUs" if res.gpus_per_node else ""}.
# Rendered from {_in_repo(study.path).replace("$REPO/", "")} by `megatron-cpt launch render-sbatch`;
# edit the study config and re-render instead of editing this file.
#
# Submit from the repository root:   sbatch {"slurm/" + script_name(cell)}
# Resumes by itself: the trainer saves and exits {rf.EXIT_REQUEUE} on SIGUSR1 \
({size.signal_s} s before the time
# limit), SIGTERM (preemption, scontrol requeue) or its walltime margin; this script then requeues
# the same job, which continues from the latest checkpoint in the same run folder. A crash (any
# exit but 0, 2 bad input, 3 non-finite loss, 5 superseded by another launch, {rf.EXIT_REQUEUE}) is
# retried the same way up to MAX_FAILURES times;
# every launch's outcome is appended to $RUN_DIR/{rf.LAUNCHES}. A requeue SLURM refuses exits 1.
#
# Overrides (environment variables at `sbatch` time; they are exported to the job):
#   SBATCH_PARTITION / SBATCH_ACCOUNT / SBATCH_QOS   partition, account, QOS (read by sbatch itself)
#   sbatch --nodes=N ...     more nodes = more data parallelism (global batch unchanged); keep N
#                            for the whole run: a resumed run must keep its world size
#   MCPT_STUDY_DIR           run folders (checkpoints, metrics)   default: {_rel_default(study.study_dir)}
#   MCPT_DATA_ROOT           tokenized prefixes <corpus>_train / <domain>_valid   default: {_rel_default(study.data_root)}
#   MCPT_CKPT_ROOT           converted base checkpoints <model>/  default: {_rel_default(study.checkpoint_root)}
#   MCPT_CONTAINER_IMAGE     run inside this image (pyxis/enroot srun --container-image)
#   MCPT_CONTAINER_MOUNTS    its --container-mounts (default: $REPO)
#   MCPT_ENV                 a file sourced first (module loads, virtualenv activation)
#   MCPT_PYTHON              the Python with megatron-cpt installed (default: python)
#   MCPT_REPO                the repository root (default: the submission directory)
{sbatch_lines}
set -uo pipefail

REPO="${{MCPT_REPO:-$SLURM_SUBMIT_DIR}}"
if [ -n "${{MCPT_ENV:-}}" ]; then source "$MCPT_ENV"; fi
PYTHON="${{MCPT_PYTHON:-python}}"
STUDY_DIR="${{MCPT_STUDY_DIR:-{_in_repo(study.study_dir)}}}"
DATA_ROOT="${{MCPT_DATA_ROOT:-{_in_repo(study.data_root)}}}"
CKPT_ROOT="${{MCPT_CKPT_ROOT:-{_in_repo(study.checkpoint_root)}}}"
RUN_DIR="$STUDY_DIR/runs/{size.name}/{cell.corpus}"
MAX_REQUEUES={res.max_requeues}
MAX_FAILURES={res.max_failures}

CONTAINER=()
if [ -n "${{MCPT_CONTAINER_IMAGE:-}}" ]; then
  CONTAINER=(--container-image="$MCPT_CONTAINER_IMAGE" --container-workdir="$REPO"
             --container-mounts="${{MCPT_CONTAINER_MOUNTS:-$REPO}}")
fi
export OMP_NUM_THREADS="${{SLURM_CPUS_PER_TASK:-1}}"
{_connections_line(size.tp)}export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
export MASTER_PORT="{rf.MASTER_PORT_SHELL}"
echo "[$(date -u +%FT%TZ)] {job}: job $SLURM_JOB_ID restart ${{SLURM_RESTART_COUNT:-0}} on $SLURM_JOB_NODELIST -> $RUN_DIR"

rm -f "$RUN_DIR/{rf.EXIT_STATUS}"
srun --kill-on-bad-exit=1 ${{CONTAINER[@]+"${{CONTAINER[@]}}"}} \\
  "$PYTHON" -m megatron_cpt train --config "{_in_repo(study.train_config)}" \\
    {override_lines}
rc=$?
# The trainer's own verdict (rank 0 writes it before the ranks leave together): srun's code can
# be a kill, because --kill-on-bad-exit stops the slower ranks once one has exited {rf.EXIT_REQUEUE}.
code="$(sed -n 's/.*"code": *\\([0-9]*\\).*/\\1/p' "$RUN_DIR/{rf.EXIT_STATUS}" 2>/dev/null)"
code="${{code:-$rc}}"

{rf.requeue_shell(job)}
"""


def _connections_line(tp: int) -> str:
    """The CUDA_DEVICE_MAX_CONNECTIONS export of a TP cell (runtime/cuda_connections.py)."""
    line = shell_export(tp)
    return line + "\n" if line else ""


def _rel_default(path: Path) -> str:
    return _in_repo(path).replace("$REPO/", "")


@dataclasses.dataclass
class Rendering:
    """Every cell's script text, and the cells refused (script name -> the one-line reason)."""

    scripts: dict[str, str]
    refused: dict[str, str]

    def refusal(self) -> str:
        """The one line for a grid with refused cells: the first reason, then the count."""
        first = next(iter(self.refused.values()))
        total = len(self.scripts) + len(self.refused)
        return (f"{first} [{len(self.refused)} of {total} cells refused, no script written: fix "
                f"the study, or --skip-refused writes the other {len(self.scripts)}]")


def render_cells(study: StudyConfig) -> Rendering:
    """Render every cell in memory; a refused cell (resources, memory) is collected, not raised,
    so the caller decides before writing anything."""
    scripts, refused = {}, {}
    for cell in study.cells():
        try:
            scripts[script_name(cell)] = render(cell)
        except UsageError as exc:
            refused[script_name(cell)] = str(exc)
    return Rendering(scripts, refused)


def write_scripts(scripts: dict[str, str], out_dir: Path) -> list[Path]:
    """Write the rendered scripts into ``out_dir`` (executable); returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in scripts.items():
        path = out_dir / name
        path.write_text(text)
        path.chmod(0o755)
        written.append(path)
    return written


def render_all(study: StudyConfig, out_dir: Path, skip_refused: bool = False) -> list[Path]:
    """Write every cell's script into ``out_dir``; returns the paths written. All or nothing:
    a refused cell raises UsageError before any file is written, unless ``skip_refused``."""
    rendering = render_cells(study)
    if rendering.refused and not skip_refused:
        raise UsageError(rendering.refusal())
    return write_scripts(rendering.scripts, out_dir)
