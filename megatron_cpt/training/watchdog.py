"""Hang watchdog (``train.hang_timeout_min``): a hung job reports where it hung and exits.

Every rank runs a daemon thread. The loop calls :meth:`Watchdog.beat` after each step and each
save; when no beat came for the timeout, the thread writes ``RUN/hang/rank_NNNNN.txt`` (the
last collective this rank entered, then every thread's Python stack from faulthandler), rank 0
writes ``exit_status.json`` with :data:`~megatron_cpt.run_folder.EXIT_HANG`, and the process
exits with that code. Launchers retry it like a crash. A hang stops every rank (each step is
collective), so all watchdogs fire within a poll of each other; each waits
:data:`GRACE_S` before exiting so that no rank dies of a peer's closed connection before its
own report is written, then ends its helper processes and exits.
"""
from __future__ import annotations

import faulthandler
import os
import threading
import time

from megatron_cpt import run_folder as rf
from megatron_cpt.run_folder import RunFolder
from megatron_cpt.runtime.collectives import CollectiveTrace

GRACE_S = 5.0


class Watchdog:
    def __init__(self, run: RunFolder, rank: int, timeout_min: float, iterations: int):
        self.run, self.rank, self.iterations = run, rank, iterations
        self.timeout_s = timeout_min * 60.0
        self.trace = CollectiveTrace()
        self.iteration = 0
        self.doing, self._doing_since = "starting", time.monotonic()
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        """Arm (after the launch is built: loading and dataset indexing are not steps)."""
        self.trace.install()
        self._last = time.monotonic()
        if self.timeout_s > 0:
            self._thread.start()
        return self

    def beat(self, iteration: int) -> None:
        """A step, save or validation of ``iteration`` completed."""
        self.iteration, self._last = iteration, time.monotonic()

    def phase(self, doing: str) -> None:
        """Name what this rank does now (for the report; no effect on the timeout)."""
        self.doing, self._doing_since = doing, time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        self.trace.uninstall()

    def _watch(self) -> None:
        poll = min(1.0, self.timeout_s / 10)
        while not self._stop.wait(poll):
            if time.monotonic() - self._last >= self.timeout_s:
                self._fire()

    def _fire(self) -> None:
        now = time.monotonic()
        idle = now - self._last
        self.run.hang_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run.hang_report(self.rank), "w") as f:
            f.write(f"rank {self.rank} pid {os.getpid()}: no step or save completed for "
                    f"{idle:.1f} s (train.hang_timeout_min = {self.timeout_s / 60:g}) after "
                    f"iteration {self.iteration}\n"
                    f"phase: {self.doing} (entered {now - self._doing_since:.1f} s ago)\n"
                    f"last collective entered: {self.trace.describe()}\n"
                    "(calls through torch.distributed.NAME; Megatron's bucketed gradient "
                    "reduce-scatter / all-gather are bound at import and show in the stacks)\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
            f.flush()
            os.fsync(f.fileno())
        print(f"[hang watchdog] rank {self.rank}: no progress for {idle:.0f} s; stacks in "
              f"{self.run.hang_report(self.rank)}; exiting {rf.EXIT_HANG}", flush=True)
        if self.rank == 0:
            self.run.write_exit_status(rf.EXIT_HANG, self.iteration, self.iterations)
        time.sleep(GRACE_S)
        _kill_helpers()
        os._exit(rf.EXIT_HANG)


def _kill_helpers() -> None:
    """End this rank's helper processes (the checkpoint writer's workers ignore SIGTERM by
    design): left behind, they hold the job step's output open and srun waits for them."""
    import psutil  # a dependency of megatron-core's checkpoint writer

    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass
