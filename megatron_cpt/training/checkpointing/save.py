"""Writing a launch's checkpoints (:class:`Checkpointer`): step 1 of the commit protocol, sync
or async, through megatron-core's dist checkpointing (optionally fully parallel)."""
from __future__ import annotations

import functools
import os
import socket
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_cpt.checkpoint import store
from megatron_cpt.run_folder import RunFolder
from megatron_cpt.runtime import mcore_patches
from megatron_cpt.training.checkpointing.async_write import _one_request
from megatron_cpt.training.checkpointing.commit import commit_checkpoint
from megatron_cpt.training.checkpointing.folder import OPTIMIZER, RESUME, TRAINER, iter_name
from megatron_cpt.training.checkpointing.layout import DP_RESHARDABLE
from megatron_cpt.training.checkpointing.state import _adam_step, _rng_state, _state_dicts


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


@dataclass
class SaveOptions:
    """Where and how a launch checkpoints (``checkpoint`` section + the plan's grid)."""

    run_dir: Path
    pretrained: Path
    keep_last: int
    keep_iterations: set[int]
    async_save: bool = False
    fully_parallel: bool = False
    lease_token: str | None = None  # the run-folder lease this launch holds: checked at commit


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
                "written_by": {"host": socket.gethostname(), "job": os.environ.get("SLURM_JOB_ID"),
                               "pid": os.getpid()},
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
        commit_checkpoint(self.opts, tmp, final, iteration, meta)
        self.committed.append(final.name)
