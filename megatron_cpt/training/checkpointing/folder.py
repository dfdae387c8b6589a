"""The run's ``checkpoints/`` folder: checkpoint names, which ``iter_N`` exist, the ``latest``
pointer (only this module writes it) and leftovers of a crash. What is *inside* a checkpoint is
the other modules' business."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from megatron_cpt.checkpoint import store
from megatron_cpt.run_folder import RunFolder


TRAINER, OPTIMIZER = "trainer", "optimizer"
RESUME, EVALUATION = "resume", "evaluation"  # metadata.json kind of a run checkpoint


def iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The committed checkpoint ``latest`` points at, or None on a fresh run."""
    run = RunFolder(run_dir)
    name = run.latest_name()
    if name is None:
        return None
    ckpt = run.checkpoints / name
    return ckpt if store.is_checkpoint(ckpt) else None


def _iteration_of(name: str) -> int | None:
    return int(name[5:]) if name.startswith("iter_") and name[5:].isdigit() else None


def committed(run_dir: Path) -> list[Path]:
    """The run's ``iter_N`` folders, oldest first (complete or not)."""
    root = RunFolder(run_dir).checkpoints
    found = [p for p in root.glob("iter_*") if _iteration_of(p.name) is not None] \
        if root.is_dir() else []
    return sorted(found, key=lambda p: _iteration_of(p.name))


def point_latest(run_dir: Path, name: str) -> None:
    """Rank 0: move ``checkpoints/latest`` to ``name`` (an explicit ``--resume-from``)."""
    _write_latest(RunFolder(run_dir).latest_pointer, name)


def clean_stale(run_dir: Path) -> list[str]:
    """Remove half-written checkpoint folders left by a crash (rank 0, before training)."""
    root = RunFolder(run_dir).checkpoints
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".") and (".tmp" in p.name or ".old" in p.name):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return removed


def _write_latest(pointer: Path, name: str) -> None:
    """The run folder's ``checkpoints/latest``; only this module writes it."""
    tmp = pointer.with_name(pointer.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, pointer)


def _is_complete(ckpt: Path) -> bool:
    meta = ckpt / store.METADATA
    return meta.is_file() and json.loads(meta.read_text()).get("complete") is True


def read_latest_meta(run_dir: Path) -> dict | None:
    ckpt = latest_checkpoint(run_dir)
    return None if ckpt is None else json.loads((ckpt / store.METADATA).read_text())
