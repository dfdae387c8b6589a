"""The resume decision: fresh start, resume from ``latest`` or ``--resume-from``, or a one-line
refusal naming the newest complete checkpoint. Every file a resume reads is checked here, before
any tensor exists."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megatron_cpt.checkpoint import store
from megatron_cpt.errors import UsageError
from megatron_cpt.run_folder import RunFolder
from megatron_cpt.training.checkpointing.folder import (EVALUATION, OPTIMIZER, TRAINER,
                                                        _is_complete, _iteration_of, committed,
                                                        iter_name)
from megatron_cpt.training.checkpointing.layout import Layout, layout_problem


def _dist_problem(ckpt: Path, sub: str) -> str | None:
    """Why the dist checkpoint ``ckpt/sub`` cannot be read, or None: its index and each
    ``.distcp`` file it names, complete."""
    from torch.distributed.checkpoint import FileSystemReader

    folder = ckpt / sub
    if not (folder / ".metadata").is_file():
        return f"has no {sub}/ (or its .metadata)"
    try:
        storage = FileSystemReader(str(folder)).read_metadata().storage_data
    except Exception as exc:  # a torn or foreign index: any reader error means unusable
        return f"has an unreadable {sub}/.metadata ({type(exc).__name__})"
    for info in storage.values():
        f = folder / info.relative_path
        if not f.is_file() or f.stat().st_size < info.offset + info.length:
            return f"lacks {sub}/{info.relative_path} (missing or truncated)"
    return None


def damaged_file(folder: Path) -> str | None:
    """The first ``.distcp`` of the dist checkpoint ``folder`` holding an item that does not
    deserialize (None: none found). Each item is a ``torch.save`` archive, so a damaged header
    shows here; damaged tensor bytes do not (the format has no checksum). Reads the whole
    folder, so only after a load already failed."""
    import io

    import torch
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(str(folder)).read_metadata().storage_data
    except Exception:  # an unreadable index is _dist_problem's finding, not a damaged file
        return None
    by_file: dict[str, list] = {}
    for info in storage.values():
        if not info.transform_descriptors:  # compressed items would need their transform
            by_file.setdefault(info.relative_path, []).append(info)
    for name, items in sorted(by_file.items()):
        with open(folder / name, "rb") as f:
            for info in sorted(items, key=lambda i: i.offset):
                f.seek(info.offset)
                try:
                    torch.load(io.BytesIO(f.read(info.length)), map_location="cpu",
                               weights_only=False)
                except Exception:
                    return name
    return None


def checkpoint_problem(ckpt: Path, world: int, layout: "Layout | None" = None) -> str | None:
    """Why ``ckpt`` cannot be resumed by ``world`` ranks in ``layout`` (default: TP1 PP1), or
    None: every file a resume reads is checked (metadata, both dist checkpoints' indexes and each
    ``.distcp`` they name, the writer's per-rank trainer state), so a resume never fails
    half-way through loading; then whether its optimizer format loads at this layout."""
    if not ckpt.is_dir():
        return "does not exist"
    if not (ckpt / store.METADATA).is_file():
        return f"has no {store.METADATA} (never committed)"
    meta = json.loads((ckpt / store.METADATA).read_text())
    if meta.get("kind") == EVALUATION:
        return "is an evaluation checkpoint (weights only, its optimizer state was dropped)"
    for sub in (store.WEIGHTS, OPTIMIZER):
        problem = _dist_problem(ckpt, sub)
        if problem:
            return problem
    for r in range(meta.get("world_size") or 0):
        if not (ckpt / TRAINER / f"rank_{r:05d}.pt").is_file():
            return f"lacks {TRAINER}/rank_{r:05d}.pt"
    return layout_problem(meta, layout or Layout(dp=world))


@dataclass
class Resume:
    """What a launch does with its run folder: start fresh from ``model.pretrained`` or
    resume ``checkpoint`` at ``iteration``; ``explicit`` when chosen by ``--resume-from``."""

    checkpoint: Path | None = None
    iteration: int = 0
    explicit: bool = False
    layout_change: str | None = None  # "TP2 PP1 DP1 -> TP1 PP1 DP2" when the layout differs
    complete: bool = False  # the run finished and dropped its optimizer state: nothing to train

    def describe(self) -> str:
        if self.complete:
            return (f"run complete at iteration {self.iteration} ({self.checkpoint.name} is its "
                    "weights-only final checkpoint): nothing to train")
        if self.checkpoint is None:
            return "fresh start from model.pretrained (the run folder holds no checkpoint)"
        how = "--resume-from" if self.explicit else "checkpoints/latest"
        change = f"; layout {self.layout_change}" if self.layout_change else ""
        return f"resume at iteration {self.iteration} from {self.checkpoint.name} ({how}){change}"


def _layout_change(ckpt: Path, layout: Layout) -> str | None:
    old = Layout.from_meta(store.read_metadata(ckpt))
    if old is None or (old.tp, old.pp, old.dp) == (layout.tp, layout.pp, layout.dp):
        return None
    return f"{old.describe()} -> {layout.describe()}"


def newest_complete(run_dir: Path, world: int, layout: Layout | None = None,
                    other_than: str | None = None) -> Path | None:
    """The newest checkpoint of the run folder that resumes at ``layout`` (None: none does),
    skipping ``other_than`` (the one just found broken)."""
    return next((p for p in reversed(committed(run_dir)) if p.name != other_than
                 and checkpoint_problem(p, world, layout) is None), None)


def what_to_do(run_dir: Path, world: int, layout: Layout | None = None,
               other_than: str | None = None) -> str:
    """The second half of a refusal: which checkpoint to relaunch from, or how to start over."""
    good = newest_complete(run_dir, world, layout, other_than)
    other = f" other than {other_than}" if other_than else ""
    if good is not None:
        return (f"the newest complete checkpoint{other} is {good.name}: relaunch with "
                f"--resume-from {good.name}")
    return (f"no{' other' if other_than else ''} complete checkpoint remains: move checkpoints/ "
            "away to start again from model.pretrained")


def _refuse(run_dir: Path, what: str, world: int, layout: Layout | None = None) -> UsageError:
    return UsageError(f"run folder {run_dir}: {what}; {what_to_do(run_dir, world, layout)}")


def _named_checkpoint(run: RunFolder, resume_from: str) -> Path:
    """The folder ``--resume-from`` names: ``iter_N``, ``N`` or a path to a checkpoint of this
    run folder. A path that leads elsewhere (``..``, another run's absolute path) is refused:
    resuming it would continue another run's optimizer and schedule in this folder and then
    overwrite this run's own checkpoints; another run's weights are a new run's
    ``model.pretrained``."""
    it = int(resume_from) if resume_from.isdigit() else _iteration_of(resume_from)
    if it is not None:
        return run.checkpoints / iter_name(it)
    ckpt = run.checkpoints / resume_from
    if ckpt.resolve().parent != run.checkpoints.resolve():
        own = [p.name for p in committed(run.path)]
        listed = ", ".join(own[-5:]) if own else f"none yet in {run.checkpoints}"
        raise UsageError(
            f"--resume-from {resume_from} is not in this run folder ({run.path}): --resume-from "
            f"names a checkpoint of this run folder ({listed}); to start from another run's "
            f"weights, make a new run with model.pretrained: {ckpt.resolve()}")
    return ckpt


def plan_resume(run_dir: Path, world: int, resume_from: str | None = None,
                layout: Layout | None = None) -> Resume:
    """Fresh start, resume, or a UsageError (exit 2) naming the newest complete checkpoint.
    A folder that holds checkpoints is never silently re-initialised from model.pretrained.
    ``layout`` (default TP1 PP1 DP ``world``) may differ from the checkpoint's where its
    optimizer format allows (:func:`layout_problem`)."""
    run, layout = RunFolder(run_dir), layout or Layout(dp=world)
    if resume_from:
        ckpt = _named_checkpoint(run, resume_from)
        problem = checkpoint_problem(ckpt, world, layout)
        if problem:
            raise _refuse(run_dir, f"--resume-from {resume_from}: {ckpt.name} {problem}", world,
                          layout)
        return Resume(ckpt, _iteration_of(ckpt.name), True, _layout_change(ckpt, layout))
    name, found = run.latest_name(), committed(run_dir)
    if name is None and not found and not run.latest_pointer.exists():
        return Resume()
    if name is None:
        held = f"checkpoints/ holds {found[-1].name} but " if found else ""
        raise _refuse(run_dir, f"{held}checkpoints/latest is missing or empty", world, layout)
    ckpt = run.checkpoints / name
    if _is_complete(ckpt):
        return Resume(ckpt, _iteration_of(name) or 0, complete=True)
    problem = checkpoint_problem(ckpt, world, layout)
    if problem and problem.startswith("was "):  # complete, but not loadable at this layout
        raise UsageError(f"{ckpt} {problem}")
    if problem:
        raise _refuse(run_dir, f"checkpoints/latest names {name}, which {problem}", world, layout)
    return Resume(ckpt, _iteration_of(name) or 0, layout_change=_layout_change(ckpt, layout))
