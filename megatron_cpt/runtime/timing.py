"""Time a stretch of a rank's work on the clock that measures it: CUDA events on a GPU, the
host clock on the CPU. Decided once, by :func:`work_timer`.

Why: CUDA kernels run asynchronously, so on a GPU the host clock between two points in Python
measures how long the kernels took to *launch*, not to run. Events recorded on the current
stream measure the device's time between the two points instead (including any time the
device waited for the host). Reading them waits for the second event only, when the figure is
needed, not at every step.
"""
from __future__ import annotations

import time

import torch


class HostTimer:
    """Wall clock between :meth:`start` and :meth:`stop` (CPU work is synchronous)."""

    def __init__(self):
        self._t0: float | None = None
        self._t1: float | None = None

    def start(self) -> None:
        self._t0, self._t1 = time.perf_counter(), None

    def stop(self) -> None:
        self._t1 = time.perf_counter()

    def seconds(self) -> float | None:
        """The last start-to-stop time; None before a stop."""
        if self._t0 is None or self._t1 is None:
            return None
        return self._t1 - self._t0


class CudaEventTimer:
    """Device time between :meth:`start` and :meth:`stop` on the current CUDA stream. The
    events are made at the first start (a CPU-only torch cannot construct them)."""

    def __init__(self):
        self._events: tuple | None = None
        self._stopped = False

    def start(self) -> None:
        if self._events is None:
            self._events = (torch.cuda.Event(enable_timing=True),
                            torch.cuda.Event(enable_timing=True))
        self._events[0].record()
        self._stopped = False

    def stop(self) -> None:
        self._events[1].record()
        self._stopped = True

    def seconds(self) -> float | None:
        """The last start-to-stop device time (waits for the stop event); None before a stop."""
        if self._events is None or not self._stopped:
            return None
        start, end = self._events
        end.synchronize()
        return start.elapsed_time(end) / 1000.0


def work_timer(device: torch.device) -> HostTimer | CudaEventTimer:
    """The timer for work done on ``device``."""
    return CudaEventTimer() if torch.device(device).type == "cuda" else HostTimer()
