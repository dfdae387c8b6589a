"""Run checkpoints: ``RUN/checkpoints/iter_0000100/`` folders in the checkpoint-store format.

Each run checkpoint is a regular store checkpoint (``weights/``, ``model.yaml``, ``tokenizer/``,
``metadata.json``), so conversion and evaluation read it like a converted one. Two kinds
(``metadata.json`` ``kind``):

* ``resume`` (the last ``checkpoint.keep_last``): ``weights/`` (a Megatron dist checkpoint of the
  model only, in the training dtype), ``optimizer/`` (the optimizer state as its own dist
  checkpoint: distributed optimizer in ``dp_reshardable`` form), ``trainer/rank_NNNNN.pt`` (each
  rank's RNG states), and in ``metadata.json`` iteration, consumed_samples, tokens, flops, the
  scheduler state and the config hash;
* ``evaluation`` (older checkpoints on the ``keep_every_tokens`` grid): ``weights/`` and
  metadata only. Retention turns a resume checkpoint into one by rewriting ``metadata.json``
  (atomically, first) and then removing ``optimizer/`` and ``trainer/``.

Writes go through Megatron-core's dist checkpointing, optionally fully parallel (each DP rank
writes and reads its share: ``FullyParallelSave/LoadStrategyWrapper``) and asynchronous
(``async_sharded_save`` + ``AsyncCallsQueue``: the loop blocks for the host copy only; the
write runs in a forked process; the commit below runs once every rank's write finished, at a
later step's :meth:`Checkpointer.poll` or at :meth:`Checkpointer.wait`).

Commit protocol (a crash at any point leaves the previous checkpoint intact):
  1. all ranks write into ``checkpoints/.iter_N.tmp/`` (sync, or async in the background);
  2. once every rank's write finished: rank 0 writes ``metadata.json`` last, renames the folder
     to ``iter_N``;
  3. rank 0 rewrites ``checkpoints/latest`` (write ``latest.tmp``, fsync, rename);
  4. rank 0 applies retention (keep the last k; demote the evaluation grid; delete the rest).
``latest`` is the only pointer that resume trusts; leftover ``.tmp`` folders are removed at
the next start.

Layout changes (docs/training.md "Layout changes"): ``metadata.json`` records the writer's
:class:`Layout` and ``optimizer_format``. A ``dp_reshardable`` checkpoint resumes at any DP with
the same TP/PP; a ``fully_reshardable`` one at any TP/PP/DP. Per-rank RNG states are restored
exactly when TP/PP are unchanged (DP replicas hold one common state); otherwise every rank is
re-seeded and the loop logs it.
"""
from __future__ import annotations

import functools
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_cpt.checkpoint import store
from megatron_cpt.errors import UsageError
from megatron_cpt.runtime import mcore_patches
from megatron_cpt.run_folder import RunFolder
from megatron_cpt.training import fault_hooks

TRAINER, OPTIMIZER = "trainer", "optimizer"
RESUME, EVALUATION = "resume", "evaluation"  # metadata.json kind of a run checkpoint
DP_RESHARDABLE, FULLY_RESHARDABLE = "dp_reshardable", "fully_reshardable"
MCORE_MIN_BUCKET = 40_000_000  # megatron-core DDP: bucket_size = max(40M, 1M x DP) with overlap


@dataclass(frozen=True)
class Layout:
    """A launch's process layout. Megatron's default rank order (``tp-cp-ep-dp-pp``, CP = EP = 1)
    puts TP fastest, then DP, then PP. ``bucket_size``: megatron-core's DDP bucket (None: one
    bucket), which a ``dp_reshardable`` optimizer checkpoint depends on."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    bucket_size: int | None = None

    @classmethod
    def of(cls, tp: int, pp: int, dp: int, overlap_grad_reduce: bool = False) -> "Layout":
        bucket = max(MCORE_MIN_BUCKET, 1_000_000 * dp) if overlap_grad_reduce else None
        return cls(tp, pp, dp, bucket)

    @classmethod
    def from_meta(cls, meta: dict) -> "Layout | None":
        """The writer's layout (None for checkpoints written before layouts were recorded)."""
        d = meta.get("layout")
        return None if not d else cls(d["tp"], d["pp"], d["dp"], d.get("bucket_size"))

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def rank(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return tp_rank + self.tp * (dp_rank + self.dp * pp_rank)

    def describe(self) -> str:
        return f"TP{self.tp} PP{self.pp} DP{self.dp}"

    def to_dict(self) -> dict:
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp, "world_size": self.world,
                "bucket_size": self.bucket_size}


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


def layout_problem(meta: dict, layout: Layout) -> str | None:
    """Why a checkpoint with ``meta`` cannot load at ``layout`` (None: it can). What cannot
    load: a ``dp_reshardable`` optimizer state at another TP/PP (its shards are DP slices of
    TP/PP-local buffers) or with another DDP bucket layout; a checkpoint older than the layout
    record at another world size (its layout is unknown)."""
    old, ranks = Layout.from_meta(meta), meta.get("world_size")
    if old is None:
        return None if ranks == layout.world else (
            f"was written by {ranks} ranks before layouts were recorded, this launch has "
            f"{layout.world}; resume it once with {ranks} processes and the same TP/PP")
    if meta.get("optimizer_format", DP_RESHARDABLE) == FULLY_RESHARDABLE:
        return None
    fix = (f"relaunch at TP{old.tp} PP{old.pp}, or resume there once with "
           f"checkpoint.optimizer_format={FULLY_RESHARDABLE} and save")
    if (old.tp, old.pp) != (layout.tp, layout.pp):
        return (f"was saved at {old.describe()} with checkpoint.optimizer_format={DP_RESHARDABLE}, "
                f"which resumes only at TP{old.tp} PP{old.pp} (any DP), not at "
                f"{layout.describe()}; {fix}")
    if old.bucket_size != layout.bucket_size:
        return (f"was saved with gradient buckets of {old.bucket_size} parameters, this launch "
                f"uses {layout.bucket_size} (megatron-core sizes them max(40M, 1M x DP) with "
                f"overlap_grad_reduce); {DP_RESHARDABLE} optimizer state needs the same buckets: "
                f"{fix}")
    return None


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


def _refuse(run_dir: Path, what: str, world: int, layout: Layout | None = None) -> UsageError:
    good = [p for p in reversed(committed(run_dir))
            if checkpoint_problem(p, world, layout) is None]
    fix = (f"the newest complete checkpoint is {good[0].name}: relaunch with --resume-from "
           f"{good[0].name}") if good else \
        ("no complete checkpoint remains: move checkpoints/ away to start again from "
         "model.pretrained")
    return UsageError(f"run folder {run_dir}: {what}; {fix}")


def plan_resume(run_dir: Path, world: int, resume_from: str | None = None,
                layout: Layout | None = None) -> Resume:
    """Fresh start, resume, or a UsageError (exit 2) naming the newest complete checkpoint.
    A folder that holds checkpoints is never silently re-initialised from model.pretrained.
    ``layout`` (default TP1 PP1 DP ``world``) may differ from the checkpoint's where its
    optimizer format allows (:func:`layout_problem`)."""
    run, layout = RunFolder(run_dir), layout or Layout(dp=world)
    if resume_from:
        it = _iteration_of(resume_from) if not resume_from.isdigit() else int(resume_from)
        ckpt = run.checkpoints / iter_name(it) if it is not None else run.checkpoints / resume_from
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


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _state_dicts(gpt, optimizer, is_loading: bool, optimizer_format: str = DP_RESHARDABLE) -> dict:
    """Model + optimizer sharded state; ``optimizer_format`` is megatron-core's distributed-
    optimizer sharding type (the one a checkpoint was saved with, when loading)."""
    model_sd = gpt.sharded_state_dict()
    return {"model": model_sd,
            "optimizer": optimizer.sharded_state_dict(
                model_sd, is_loading=is_loading,
                metadata={"distrib_optim_sharding_type": optimizer_format})}




def _save_strategy(fully_parallel: bool):
    """Megatron-core's default torch_dist writer; fully parallel: each DP rank writes its
    share of the replicated tensors instead of DP rank 0 writing them all."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import \
        FullyParallelSaveStrategyWrapper

    base = get_default_save_sharded_strategy()
    if not fully_parallel:
        return base
    return FullyParallelSaveStrategyWrapper(base, ps.get_data_parallel_group(with_context_parallel=True))


def _load_strategy(folder: Path, fully_parallel: bool):
    """The matching reader; fully parallel: each DP rank reads a share, then they exchange."""
    if not fully_parallel:
        return None
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import \
        FullyParallelLoadStrategyWrapper

    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(str(folder)),
                                            ps.get_data_parallel_group(with_context_parallel=True))


def _in_writer(fn, iteration: int, parent: int):
    """The async write as it runs in its forked process: it dies with the trainer (a killed
    rank leaves no writer behind to fill a folder the relaunch reuses); test delay here."""
    def run(*args, **kwargs):
        mcore_patches.die_with_parent(parent)
        fault_hooks.delay_if_planned("slow_save", iteration)
        return fn(*args, **kwargs)
    return run


def _one_request(requests: list, commit, iteration: int):
    """The async writes of one checkpoint as one background process, one after the other.
    Megatron-core's writers report their results through one global queue, so two writes in
    flight at once swap results (each ``.metadata`` then indexes the other's files). The host
    copy (``preload_fn``) happens here, in the loop; the finalizations run in write order,
    then ``commit``."""
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest

    calls = []
    for r in requests:
        args = list(r.async_fn_args)
        if r.preload_fn is not None:
            args[1] = r.preload_fn()
        if r.async_fn is not None:
            calls.append((r.async_fn, args, r.async_fn_kwargs))

    def write_all() -> None:
        for fn, args, kwargs in calls:
            fn(*args, **kwargs)
    finalize = [f for r in requests for f in r.finalize_fns] + [commit]
    return AsyncRequest(_in_writer(write_all, iteration, os.getpid()), (), finalize)


@dataclass
class SaveOptions:
    """Where and how a launch checkpoints (``checkpoint`` section + the plan's grid)."""

    run_dir: Path
    pretrained: Path
    keep_last: int
    keep_iterations: set[int]
    async_save: bool = False
    fully_parallel: bool = False


class Checkpointer:
    """Writes a launch's checkpoints and commits each one once every rank's write finished:
    at once (sync), or at a later :meth:`poll` / :meth:`wait` (async). Collective methods."""

    def __init__(self, opts: SaveOptions):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.opts = opts
        self.queue = AsyncCallsQueue() if opts.async_save else None
        self.pending: int | None = None   # the iteration being written in the background
        self.committed: list[str] = []    # folders committed since the caller last drained it

    def save(self, iteration: int, gpt, optimizer, scheduler, meta: dict) -> Path:
        """Write checkpoint ``iteration`` (waiting first for one still in flight); returns its
        final folder, committed already when sync."""
        self.wait()
        mcore_patches.signal_proof_writer_queue()
        root = RunFolder(self.opts.run_dir).checkpoints
        final, tmp = root / iter_name(iteration), root / f".{iter_name(iteration)}.tmp"
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / TRAINER).mkdir(parents=True)
        dist.barrier()
        torch.save(_rng_state(), tmp / TRAINER / f"rank_{dist.get_rank():05d}.pt")
        meta = {"kind": RESUME, "iteration": iteration, "scheduler": scheduler.state_dict(),
                "adam_step": _adam_step(optimizer), "world_size": dist.get_world_size(), **meta}
        commit = functools.partial(self._commit, tmp, final, iteration, meta)
        state = _state_dicts(gpt, optimizer, False,
                             meta.get("optimizer_format", DP_RESHARDABLE))
        requests = [self._write(state["model"], tmp / store.WEIGHTS, iteration),
                    self._write(state["optimizer"], tmp / OPTIMIZER, iteration)]
        if self.queue is None:
            commit()
            return final
        self.queue.schedule_async_request(_one_request(requests, commit, iteration))
        self.pending = iteration
        return final

    def _write(self, sharded: dict, folder: Path, iteration: int):
        """One dist checkpoint: written now (sync) or an AsyncRequest to schedule."""
        from megatron.core import dist_checkpointing

        if dist.get_rank() == 0:
            folder.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        strategy = _save_strategy(self.opts.fully_parallel)
        return dist_checkpointing.save(sharded, str(folder), sharded_strategy=strategy,
                                       async_sharded_save=self.queue is not None)

    def poll(self) -> None:
        """Commit the background save if every rank's write has finished (one all-reduce;
        nothing when none is in flight, the same on every rank)."""
        if self.queue is not None and self.pending is not None:
            self.queue.maybe_finalize_async_calls(blocking=False)
            if self.queue.get_num_unfinalized_calls() == 0:
                self.pending = None

    def wait(self) -> None:
        """Block until the background save is written and committed (before the next save,
        a stop and the exit)."""
        if self.queue is not None and self.pending is not None:
            self.queue.maybe_finalize_async_calls(blocking=True)
            self.pending = None

    def _commit(self, tmp: Path, final: Path, iteration: int, meta: dict) -> None:
        """Steps 2-4 of the commit protocol (every rank calls it; rank 0 acts)."""
        dist.barrier()
        fault_hooks.crash_if_planned("crash_in_save", iteration)
        if dist.get_rank() == 0:
            o, root = self.opts, final.parent
            shutil.copy2(Path(o.pretrained) / store.MODEL_YAML, tmp / store.MODEL_YAML)
            shutil.copytree(Path(o.pretrained) / store.TOKENIZER, tmp / store.TOKENIZER)
            store.write_metadata(tmp, meta)
            if final.exists():  # an uncommitted folder of the same iteration (crash after rename)
                old = root / f".{final.name}.old"
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
            _write_latest(RunFolder(o.run_dir).latest_pointer, final.name)
            _retain(root, iteration, o.keep_last, o.keep_iterations)
        dist.barrier()
        self.committed.append(final.name)


def _write_latest(pointer: Path, name: str) -> None:
    """The run folder's ``checkpoints/latest``; only this module writes it."""
    tmp = pointer.with_name(pointer.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, pointer)


def _retain(root: Path, newest: int, keep_last: int, keep_iterations: set[int]) -> None:
    """Keep the last ``keep_last`` checkpoints up to ``newest`` (the one just committed) as
    resume checkpoints; older ones on the evaluation grid become evaluation checkpoints, the
    rest go. Folders after ``newest`` (left behind by ``--resume-from`` an older one) neither
    count as kept nor push a good checkpoint out; the next saves replace them."""
    its = sorted(i for i in (_iteration_of(p.name) for p in root.glob("iter_*"))
                 if i is not None and i <= newest)
    for it in its[:-keep_last] if len(its) > keep_last else []:
        if it in keep_iterations:
            drop_optimizer_state(root / iter_name(it))
        else:
            shutil.rmtree(root / iter_name(it), ignore_errors=True)


def drop_optimizer_state(ckpt: Path, complete: bool = False) -> None:
    """Make ``ckpt`` an evaluation checkpoint: ``metadata.json`` says so first (atomically),
    then ``optimizer/`` and ``trainer/`` go; idempotent, so a crash in between is finished
    by the next retention. ``complete``: the final checkpoint of a finished run."""
    meta = json.loads((ckpt / store.METADATA).read_text())
    if meta.get("kind") != EVALUATION or (complete and not meta.get("complete")):
        meta.pop("format", None)
        store.write_metadata(ckpt, {**meta, "kind": EVALUATION,
                                    **({"complete": True} if complete else {})})
    shutil.rmtree(ckpt / OPTIMIZER, ignore_errors=True)
    shutil.rmtree(ckpt / TRAINER, ignore_errors=True)


def _is_complete(ckpt: Path) -> bool:
    meta = ckpt / store.METADATA
    return meta.is_file() and json.loads(meta.read_text()).get("complete") is True


def drop_optimizer_state_at_end(run_dir: Path, final: int, keep_iterations: set[int]) -> None:
    """Rank 0, once the budget is spent (``checkpoint.keep_optimizer_at_end: false``): the
    final checkpoint becomes a weights-only one marked ``complete`` (first: from then on a
    relaunch finds the run complete), then every older checkpoint of the evaluation grid
    becomes weights-only and the other resume checkpoints go. Idempotent."""
    drop_optimizer_state(RunFolder(run_dir).checkpoints / iter_name(final), complete=True)
    for ckpt in committed(run_dir):
        it = _iteration_of(ckpt.name)
        if it >= final:
            continue
        if it in keep_iterations:
            drop_optimizer_state(ckpt)
        else:
            shutil.rmtree(ckpt, ignore_errors=True)


def _torch_optimizers(optimizer) -> list:
    return [opt.optimizer for opt in getattr(optimizer, "chained_optimizers", [optimizer])]


def _adam_step(optimizer) -> float | None:
    """torch Adam's per-param ``step`` (None for fused optimizers that keep it elsewhere)."""
    for inner in _torch_optimizers(optimizer):
        for st in inner.state.values():
            if isinstance(st.get("step"), torch.Tensor):
                return float(st["step"])
    return None


def _init_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer the state tensors a loaded checkpoint will overwrite.

    torch's Adam creates its state lazily at the first step, but Megatron-core's
    ``DistributedOptimizer.state_dict()`` (0.16.1, without Apex/TE) asserts that every
    param state has one common ``step``; a freshly built optimizer has none, so resume
    would fail before loading. TE/Apex fused optimizers use Megatron's own ``init_state_fn``.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            for group in inner.param_groups:
                for p in group["params"]:
                    if not inner.state[p]:
                        inner.state[p].update(step=torch.tensor(0.0),
                                              exp_avg=torch.zeros_like(p.data),
                                              exp_avg_sq=torch.zeros_like(p.data))
        elif getattr(opt, "init_state_fn", None) is not None:
            opt.init_state_fn(inner, getattr(opt, "config", None))


def _restore_adam_step(optimizer, step: float | None) -> None:
    """Megatron-core 0.16.1's non-Apex/TE load path does not restore torch Adam's ``step``
    (it comes back as the template's value) and, where it sets one, shares one tensor
    across all params (foreach Adam then adds 1 per param per step). Set an own copy of
    the saved step on every param state."""
    if step is None:
        return
    for inner in _torch_optimizers(optimizer):
        for st in inner.state.values():
            if "step" in st:
                st["step"] = torch.tensor(step, dtype=torch.float32)


def _load_optimizer_state(optimizer, state: dict) -> None:
    """``optimizer.load_state_dict``, except for megatron-core 0.16.1's ``fully_reshardable``
    load with torch Adam (no Apex/TE): it copies every state key of a param from the loaded
    tensors, torch Adam's ``step`` included, which they lack (KeyError 'step'). So load the param
    groups first, then the parameter state with ``step`` set aside (:func:`_restore_adam_step`
    sets the saved one afterwards)."""
    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    parts = [state] if len(opts) == 1 else [state[k] for k in sorted(state)]
    if not any(p.get("param_state_sharding_type") == FULLY_RESHARDABLE for p in parts):
        optimizer.load_state_dict(state)
        return
    for opt, part in zip(opts, parts):
        param_state = part.pop("param_state")
        opt.load_state_dict(part)
        steps = {p: st.pop("step") for p, st in opt.optimizer.state.items() if "step" in st}
        opt.load_parameter_state_from_fully_reshardable(param_state)
        for p, step in steps.items():
            opt.optimizer.state[p]["step"] = step


def _load_strict(ckpt: Path, sub: str, sharded: dict, fully_parallel: bool) -> dict:
    """Megatron's dist load of ``ckpt/sub`` refusing any missing or unexpected key, as one
    line (exit 2)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    folder = Path(ckpt) / sub
    try:
        return dist_checkpointing.load(sharded, str(folder), strict=StrictHandling.RAISE_ALL,
                                       sharded_strategy=_load_strategy(folder, fully_parallel))
    except Exception as exc:  # CheckpointingException or torch's CheckpointException
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{ckpt} cannot be resumed: {first}; pass --resume-from an older "
                         "checkpoint") from exc


def load(ckpt: Path, gpt, optimizer, scheduler, layout: "Layout | None" = None,
         seed: int = 0, fully_parallel: bool = False) -> dict:
    """Full resume (collective): model, optimizer, scheduler, RNG. Returns the metadata, with
    ``rng`` saying how the RNG states were restored (:func:`_restore_rng`)."""
    meta = store.read_metadata(ckpt)
    layout = layout or Layout(dp=dist.get_world_size())
    problem = layout_problem(meta, layout)
    if problem:  # preflight refuses this first; a direct caller gets the same line
        raise UsageError(f"{ckpt} {problem}")
    _init_optimizer_state(optimizer)
    fmt = meta.get("optimizer_format", DP_RESHARDABLE)
    sharded = _state_dicts(gpt, optimizer, True, fmt)
    state = {"model": _load_strict(ckpt, store.WEIGHTS, sharded["model"], fully_parallel),
             "optimizer": _load_strict(ckpt, OPTIMIZER, sharded["optimizer"], fully_parallel)}
    with torch.no_grad():  # fp32 main params are views of the (leaf) model params
        result = gpt.load_state_dict(state["model"], strict=False)
        keys = [k for k in result.missing_keys + result.unexpected_keys
                if not k.endswith("_extra_state")]
        if keys:
            raise UsageError(f"{ckpt} does not match this model (keys {keys[:3]}); resume it with "
                             "the config that wrote it")
        _load_optimizer_state(optimizer, state["optimizer"])
    _restore_adam_step(optimizer, meta.get("adam_step"))
    scheduler.load_state_dict(meta["scheduler"])
    meta["rng"] = _restore_rng(Path(ckpt), meta, layout, seed)
    return meta


def _restore_rng(ckpt: Path, meta: dict, layout: Layout, seed: int) -> str | None:
    """Restore this rank's RNG states; None when exact at the same layout, else what happened.
    With TP/PP unchanged a rank takes the state of the writer's rank at its TP/PP coordinates
    (DP replicas hold one common state: same seed, same consumption), so a DP change is exact.
    Across a TP/PP change no saved state belongs to a rank (Megatron's tracker is per TP rank, the
    torch generator's use per stage), so every rank is re-seeded from (seed, iteration)."""
    from megatron.core import parallel_state as ps

    from megatron_cpt.runtime import set_seed

    old = Layout.from_meta(meta) or layout
    tp, dp, pp = (ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(),
                  ps.get_pipeline_model_parallel_rank())
    if (old.tp, old.pp) == (layout.tp, layout.pp):
        src = dist.get_rank() if old.dp == layout.dp else old.rank(tp, dp % old.dp, pp)
        _set_rng_state(torch.load(ckpt / TRAINER / f"rank_{src:05d}.pt", weights_only=False))
        return None if old.dp == layout.dp else (f"RNG states restored exactly: DP {old.dp} -> "
                                                 f"{layout.dp} (DP replicas share one state)")
    set_seed((seed * 1_000_003 + int(meta["iteration"])) % 2**31)
    return (f"per-rank RNG states not restored: TP/PP changed ({old.describe()} -> "
            f"{layout.describe()}); every rank re-seeded from train.seed and iteration "
            f"{meta['iteration']} (no effect on the losses without dropout)")


def read_latest_meta(run_dir: Path) -> dict | None:
    ckpt = latest_checkpoint(run_dir)
    return None if ckpt is None else json.loads((ckpt / store.METADATA).read_text())
