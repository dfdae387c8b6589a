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
from megatron_cpt.training import fault_hooks
from megatron_cpt.training.checkpointing.folder import _write_latest
from megatron_cpt.training.checkpointing.retention import _retain

if TYPE_CHECKING:
    from megatron_cpt.training.checkpointing.save import SaveOptions


def commit_checkpoint(opts: "SaveOptions", tmp: Path, final: Path, iteration: int, meta: dict) -> None:
    """Steps 2-4 of the commit protocol (every rank calls it; rank 0 acts)."""
    dist.barrier()
    fault_hooks.crash_if_planned("crash_in_save", iteration)
    if dist.get_rank() == 0:
        o, root = opts, final.parent
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
