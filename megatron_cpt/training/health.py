"""Per-rank health at each logged step: the slowest and fastest rank, peak memory, stragglers.

Every rank's wall-clock step time is the same (each step ends in collectives that wait for
the slowest rank), so the time compared is a rank's own work: from the step's start until it
enters the gradient reduction (Megatron's ``finalize_model_grads``). Data-parallel ranks do
that work independently; tensor- and pipeline-parallel peers wait on each other inside it, so
a slow rank shows up with its whole TP/PP group. Peak memory is the GPU's max allocated bytes,
or the process's peak RSS on CPU. One all-reduce of ``world_size x 2`` floats per logged step.
A rank's work is timed by :func:`megatron_cpt.runtime.timing.work_timer`: CUDA events on a GPU
(the host clock there would time kernel launches, not the kernels), the host clock on CPU.
"""
from __future__ import annotations

import resource
import statistics

import torch
import torch.distributed as dist

from megatron_cpt.runtime.device import collective_device
from megatron_cpt.runtime.timing import work_timer


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # KiB on Linux


class RankHealth:
    def __init__(self, factor: float, intervals: int, device: torch.device):
        self.factor, self.intervals, self.device = factor, intervals, device
        self.timer = work_timer(device)
        self._slow_streak: dict[int, int] = {}

    def work_done(self) -> None:
        """This rank's own work of the step ended (it enters the gradient reduction)."""
        self.timer.stop()

    def start_step(self) -> None:
        self.timer.start()

    @property
    def work_s(self) -> float | None:
        """This rank's work time of the latest step (None until its work is done)."""
        return self.timer.seconds()

    def gather(self, step_s: float) -> tuple[dict, list[tuple[int, str]]]:
        """Collective: the record fields of this step, and straggler events (rank, details)."""
        world, rank = dist.get_world_size(), dist.get_rank()
        table = torch.zeros(world, 2, dtype=torch.float64, device=collective_device())
        work_s = self.work_s
        table[rank, 0] = work_s if work_s is not None else step_s
        table[rank, 1] = peak_memory_gb(self.device)
        dist.all_reduce(table)
        work, mem = table[:, 0].tolist(), table[:, 1].tolist()
        slow, fast = max(range(world), key=work.__getitem__), min(range(world), key=work.__getitem__)
        fields = {"rank_time_max_s": work[slow], "slowest_rank": slow,
                  "rank_time_min_s": work[fast], "fastest_rank": fast,
                  "peak_mem_gb": max(mem), "peak_mem_rank": max(range(world), key=mem.__getitem__)}
        return fields, self._stragglers(work)

    def _stragglers(self, work: list[float]) -> list[tuple[int, str]]:
        """Ranks at ``factor`` x the median rank's time or slower for ``intervals`` logged
        steps in a row (one event per streak)."""
        median = statistics.median(work)
        found = []
        for r, t in enumerate(work):
            slow = median > 0 and t >= self.factor * median
            self._slow_streak[r] = self._slow_streak.get(r, 0) + 1 if slow else 0
            if self._slow_streak[r] == self.intervals:
                found.append((r, f"rank {r} slower than the median rank by >= {self.factor:g}x for "
                             f"{self.intervals} logged steps (latest {t * 1000:.0f} ms vs median "
                             f"{median * 1000:.0f} ms)"))
        return found
