"""The last collective each rank entered, for the hang watchdog's report.

A hung job is hung in a collective; which one (and from where) tells a broken node from a
rank that diverged. NCCL's flight recorder answers this on GPUs only, so this wraps the
``torch.distributed`` functions while a training launch runs: each call through
``torch.distributed.NAME`` (how Megatron-core and the loop call them) records a counter, the
operation, its caller and whether it returned. Cost: one frame lookup per collective.
Installed by the loop for one launch and removed afterwards; nothing changes at import time.
"""
from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass

import torch.distributed as dist

# Not ``isend`` / ``irecv``: pipeline parallelism passes them as tokens to ``P2POp``, which
# checks them by identity (torch/distributed/distributed_c10d.py), so a wrapper breaks every
# PP > 1 run; their traffic is traced through ``batch_isend_irecv``.
TRACED = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object",
          "reduce_scatter", "reduce_scatter_tensor", "broadcast", "broadcast_object_list",
          "barrier", "send", "recv", "batch_isend_irecv", "all_to_all",
          "gather", "scatter", "reduce", "monitored_barrier")


@dataclass
class Entered:
    number: int      # collectives entered by this rank so far in this launch
    op: str
    caller: str      # file:line of the code that called it
    at: float        # time.time() when entered
    returned: bool = False


class CollectiveTrace:
    def __init__(self):
        self.count = 0
        self.last: Entered | None = None
        self._originals: dict = {}

    def install(self) -> "CollectiveTrace":
        for name in TRACED:
            fn = getattr(dist, name, None)
            if fn is not None and name not in self._originals:
                self._originals[name] = fn
                setattr(dist, name, self._wrap(name, fn))
        return self

    def uninstall(self) -> None:
        for name, fn in self._originals.items():
            setattr(dist, name, fn)
        self._originals.clear()

    def _wrap(self, name: str, fn):
        @functools.wraps(fn)
        def traced(*args, **kwargs):
            self.count += 1
            frame = sys._getframe(1)
            entry = Entered(self.count, name, f"{frame.f_code.co_filename}:{frame.f_lineno}",
                            time.time())
            self.last = entry
            out = fn(*args, **kwargs)
            entry.returned = True
            return out
        return traced

    def describe(self) -> str:
        """One line for the hang report."""
        e = self.last
        if e is None:
            return "no collective entered in this launch"
        state = "returned" if e.returned else "NOT RETURNED (waiting in it)"
        return (f"#{e.number} torch.distributed.{e.op} from {e.caller}, entered "
                f"{time.time() - e.at:.1f} s ago, {state}")
