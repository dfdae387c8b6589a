"""A full resume (collective): model, optimizer, scheduler and RNG states from a checkpoint that
:mod:`.resume` accepted; a load that fails anyway is one line (exit 2)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from megatron_cpt.checkpoint import store
from megatron_cpt.errors import UsageError
from megatron_cpt.run_folder import CHECKPOINTS
from megatron_cpt.training.checkpointing.folder import OPTIMIZER, TRAINER
from megatron_cpt.training.checkpointing.layout import DP_RESHARDABLE, Layout, layout_problem
from megatron_cpt.training.checkpointing.resume import damaged_file, what_to_do
from megatron_cpt.training.checkpointing.state import (_init_optimizer_state,
                                                       _load_optimizer_state, _restore_adam_step,
                                                       _set_rng_state, _state_dicts)


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


def _load_strict(ckpt: Path, sub: str, sharded: dict, fully_parallel: bool,
                 layout: Layout) -> dict:
    """Megatron's dist load of ``ckpt/sub`` refusing any missing or unexpected key; any failure
    to read it is one line (exit 2): :func:`_unreadable`."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from torch.distributed.checkpoint.api import CheckpointException

    folder = Path(ckpt) / sub
    try:
        return dist_checkpointing.load(sharded, str(folder), strict=StrictHandling.RAISE_ALL,
                                       sharded_strategy=_load_strategy(folder, fully_parallel))
    except (Exception, CheckpointException) as exc:  # torch's is a BaseException
        raise _unreadable(Path(ckpt), sub, exc, layout) from exc


def _cause(exc: BaseException) -> str:
    """The first line of what went wrong: for torch's CheckpointException, the first failed
    rank's own exception (its text is that rank's whole traceback)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        exc = next(iter(failures.values()))[0]
    text = (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _unreadable(ckpt: Path, sub: str, exc: BaseException, layout: Layout) -> UsageError:
    """A checkpoint that passed the resume checks but failed to load (bytes damaged on disk, a
    key mismatch): one line naming the damaged ``.distcp`` (rank 0 looks for it; otherwise
    the folder) and the newest complete checkpoint other than this one."""
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    bad = damaged_file(ckpt / sub) if rank0 else None
    where = f"{ckpt.name}/{sub}/{bad}" if bad else f"{ckpt.name}/{sub}/"
    run_dir = ckpt.parent.parent
    if ckpt.parent.name != CHECKPOINTS:  # not a run folder's checkpoint: nothing to suggest
        return UsageError(f"{ckpt}: {where} cannot be read ({_cause(exc)})")
    return UsageError(f"run folder {run_dir}: {where} cannot be read ({_cause(exc)}); "
                      f"{what_to_do(run_dir, layout.world, layout, other_than=ckpt.name)}")


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
    state = {"model": _load_strict(ckpt, store.WEIGHTS, sharded["model"], fully_parallel, layout),
             "optimizer": _load_strict(ckpt, OPTIMIZER, sharded["optimizer"], fully_parallel,
                                       layout)}
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
