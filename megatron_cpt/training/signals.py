"""Preemption: signals set a flag; all ranks agree on the step to stop at.

SIGTERM (SLURM preemption / scancel), SIGUSR1 and SIGUSR2 (submitit and ``--signal`` send
these ahead of the time limit) and SIGINT (Ctrl-C; torchrun's agent forwards it to every worker)
only set a flag in the handler: a Ctrl-C saves like a preemption instead of raising
KeyboardInterrupt mid-step on every rank. Each step the flag travels in
the same all-reduce that carries the loss (:meth:`StopFlag.local_code`), so every rank learns
"stop after this step" at the same iteration, saves one checkpoint together and exits with
:data:`~megatron_cpt.run_folder.EXIT_REQUEUE`. ``train.exit_before_walltime_min`` raises the same flag on rank 0 when
the SLURM job's end time comes near.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class StopFlag:
    def __init__(self, exit_before_walltime_min: float = 0.0):
        self.received: int | None = None
        self.deadline = _slurm_end_time() if exit_before_walltime_min > 0 else None
        self.margin_s = exit_before_walltime_min * 60.0
        self._previous = {}

    def install(self) -> "StopFlag":
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def describe(self) -> str:
        """The signal received, for the stop line: ``SIGINT, Ctrl-C``."""
        name = signal.Signals(self.received).name
        return f"{name}, Ctrl-C" if self.received == signal.SIGINT else name

    def local_code(self) -> float:
        """1.0 when this rank wants to stop (signal seen or walltime near), else 0.0."""
        if self.received is not None:
            return 1.0
        if self.deadline is not None and time.time() >= self.deadline - self.margin_s:
            return 1.0
        return 0.0


def _slurm_end_time() -> float | None:
    """Unix time the SLURM job ends: ``SLURM_JOB_END_TIME`` (SLURM >= 23.02) or squeue."""
    end = os.environ.get("SLURM_JOB_END_TIME")
    if end and end.isdigit():
        return float(end)
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%L"], capture_output=True,
                             text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    left = parse_slurm_duration(out)
    return None if left is None else time.time() + left


def parse_slurm_duration(text: str) -> float | None:
    """``[D-]HH:MM:SS`` / ``MM:SS`` -> seconds."""
    if not text or text in ("INVALID", "UNLIMITED", "NOT_SET"):
        return None
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [int(p) for p in text.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts
    return days * 86400 + h * 3600 + m * 60 + s
