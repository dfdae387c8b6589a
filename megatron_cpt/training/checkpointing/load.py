"""A full resume (collective): model, optimizer, scheduler and RNG states from a checkpoint that
:mod:`.resume` accepted; a load that fails anyway is one line (exit 2)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from megatron_cpt.checkpoint import store
from megatron_cpt.errors import UsageError
from megatron_cpt.training.checkpointing.folder import OPTIMIZER, TRAINER
from megatron_cpt.training.checkpointing.layout import DP_RESHARDABLE, Layout, layout_problem
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
