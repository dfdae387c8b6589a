"""Steps 2-4 of the commit protocol (package docstring): once every rank's write finished,
rank 0 completes the folder, renames it to ``iter_N``, moves ``latest`` and applies retention."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist

from megatron_cpt.checkpoint import store
from megatron_cpt.run_folder import RunFolder
from megatron_cpt.training import fault_hooks, lease
from megatron_cpt.training.checkpointing.folder import _write_latest
from megatron_cpt.training.checkpointing.retention import _retain

if TYPE_CHECKING:
    from megatron_cpt.training.checkpointing.save import SaveOptions


def _stop_unless_leased(opts: "SaveOptions", tmp: Path, iteration: int) -> None:
    """A launch that lost the run folder's lease (its node froze past the lease's staleness and
    a relaunch took over, then it came back) must not commit over the new holder's checkpoints:
    it drops its uncommitted folder and exits before the rename. Its other ranks' lease guards
    stop them within a heartbeat."""
    if opts.lease_token is None:
        return
    problem = lease.lost(RunFolder(opts.run_dir), opts.lease_token)
    if problem:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"[run lease] {problem}: checkpoint {iteration} not committed; this process "
              f"stops (exit {lease.LOST_EXIT})", flush=True)
        os._exit(lease.LOST_EXIT)


def commit_checkpoint(opts: "SaveOptions", tmp: Path, final: Path, iteration: int, meta: dict) -> None:
    """Steps 2-4 of the commit protocol (every rank calls it; rank 0 acts)."""
    dist.barrier()
    fault_hooks.crash_if_planned("crash_in_save", iteration)
    if dist.get_rank() == 0:
        o, root = opts, final.parent
        _stop_unless_leased(o, tmp, iteration)
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
