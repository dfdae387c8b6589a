"""Manual garbage collection: Python's automatic collector off during steps, a full
collection every ``train.gc_interval`` steps and at each checkpoint / validation; what is
alive when training starts (modules, model, optimizer) is frozen out of later collections.

Why: an automatic collection starts whenever allocation counters trip, at a different moment
on each rank; the other ranks then wait for it at the next collective. Collecting at the same
iteration on every rank turns those scattered stalls into one aligned pause. The peers do the
same: Megatron-LM ``--manual-gc``, Megatron-Bridge ``manual_gc=True`` (its Qwen2.5 recipe
collects every 100 steps), torchtitan ``gc_freq=50``.

``gc.freeze()`` after the first collection matters: a full collection otherwise walks every
object of torch, Megatron-core and the model (measured ~0.4 s per collection on the tiny CPU
run, docs/benchmarks.md), so the collections would cost more than the pauses they replace.
"""
from __future__ import annotations

import gc


class GCPolicy:
    """``interval``: None = Python's automatic GC (nothing done here); 0 = automatic GC off,
    collections only at checkpoints / validation; N = also every N iterations."""

    def __init__(self, interval: int | None):
        self.interval = interval
        self.manual = interval is not None
        self.collections = 0
        self._was_enabled = gc.isenabled()

    def start(self) -> None:
        if self.manual:
            self._collect()
            gc.freeze()  # the startup heap is long-lived: keep it out of every later collection
            gc.disable()

    def step(self, iteration: int) -> None:
        """After iteration ``iteration`` (1-based) finished on every rank."""
        if self.manual and self.interval and iteration % self.interval == 0:
            self._collect()

    def at_sync_point(self) -> None:
        """Before a checkpoint or validation: every rank is there at the same iteration."""
        if self.manual:
            self._collect()

    def stop(self) -> None:
        if self.manual:
            gc.unfreeze()
            if self._was_enabled:
                gc.enable()

    def _collect(self) -> None:
        gc.collect()
        self.collections += 1

    def describe(self) -> dict:
        if not self.manual:
            return {"mode": "automatic", "interval": None,
                    "why": "train.gc_interval=null: Python collects when its thresholds trip, "
                           "at different moments on each rank"}
        every = f"every {self.interval} iterations and " if self.interval else ""
        return {"mode": "manual", "interval": self.interval,
                "why": f"automatic GC off during steps; gc.collect() {every}at each checkpoint "
                       "and validation, on every rank at the same iteration"}
