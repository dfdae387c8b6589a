"""Which checkpoints stay: the last ``keep_last`` as resume checkpoints, the evaluation grid as
weights-only ones, the rest removed; and the end-of-run drop of the optimizer state."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from megatron_cpt.checkpoint import store
from megatron_cpt.run_folder import RunFolder
from megatron_cpt.training.checkpointing.folder import (EVALUATION, OPTIMIZER, TRAINER,
                                                        _iteration_of, committed, iter_name)


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
