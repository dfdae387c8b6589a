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

One job per module: ``folder`` (names, ``latest``, leftovers), ``layout`` (TP/PP/DP and what
loads where), ``resume`` (the resume decision and its checks), ``state`` (sharded state dicts,
RNG, Adam's step), ``save`` (:class:`Checkpointer`, step 1), ``async_write`` (the background
write), ``commit`` (steps 2-4), ``retention`` (keep/demote/delete) and ``load`` (a full resume).
This package re-exports what the rest of the code uses.
"""
from __future__ import annotations

from megatron_cpt.training.checkpointing.folder import (EVALUATION, OPTIMIZER, RESUME, TRAINER,
                                                        clean_stale, committed, iter_name,
                                                        latest_checkpoint, point_latest,
                                                        read_latest_meta)
from megatron_cpt.training.checkpointing.layout import (DP_RESHARDABLE, FULLY_RESHARDABLE,
                                                        MCORE_MIN_BUCKET, Layout, layout_problem)
from megatron_cpt.training.checkpointing.load import load
from megatron_cpt.training.checkpointing.resume import Resume, checkpoint_problem, plan_resume
from megatron_cpt.training.checkpointing.retention import (_retain, drop_optimizer_state,
                                                           drop_optimizer_state_at_end)
from megatron_cpt.training.checkpointing.save import Checkpointer, SaveOptions
from megatron_cpt.training.checkpointing.state import _init_optimizer_state, _state_dicts

__all__ = ["EVALUATION", "OPTIMIZER", "RESUME", "TRAINER", "DP_RESHARDABLE", "FULLY_RESHARDABLE",
           "MCORE_MIN_BUCKET", "Checkpointer", "Layout", "Resume", "SaveOptions",
           "checkpoint_problem", "clean_stale", "committed", "drop_optimizer_state",
           "drop_optimizer_state_at_end", "iter_name", "latest_checkpoint", "layout_problem",
           "load", "plan_resume", "point_latest", "read_latest_meta",
           # private, used by tests and benchmarks
           "_init_optimizer_state", "_retain", "_state_dicts"]
