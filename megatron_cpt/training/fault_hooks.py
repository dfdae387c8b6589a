"""Test-only fault injection, in one place: ``MEGATRON_CPT_TEST_FAULT=POINT@ITERATION``.

Points:
  * ``crash_in_save@N``: every rank exits :data:`FAULT_EXIT` between writing the weights of
    checkpoint N and committing its folder (checkpointing/commit.py);
  * ``nan_loss@N``: the loss of iteration N reads as NaN (loop.py);
  * ``nan_weight@N``: rank 0 writes a NaN into its first weight before iteration N's forward
    pass (the weights themselves go bad, as after an overflowed update);
  * ``nan_grad@N``: every rank writes a NaN into its first gradient after iteration N's
    backward pass and gradient all-reduce (as an overflowed reduction would).
  * ``crash_rank@N``: the last rank exits :data:`CRASH_EXIT` right after iteration N, before
    any checkpoint of N (loop.py), as a rank killed by a GPU or node fault would;
  * ``hang@N``: the last rank stops (sleeps) before iteration N, once per run folder: only
    while ``RUN/hang/`` does not exist yet, so the retried launch runs through (loop.py);
  * ``slow_rank@R``: global rank R sleeps :data:`SLOW_S` before each step (a straggler);
  * ``slow_steps@N``: every iteration from N on takes a second longer (loop.py), so a test
    can act on a launch that is still running;
  * ``slow_save@N``: the background writer of async checkpoint N waits :data:`SLOW_SAVE_S`
    before writing (checkpointing/async_write.py), so a test can signal or kill a launch mid-write.
Several faults: comma-separated, e.g. ``slow_save@20,slow_steps@20``.
``MEGATRON_CPT_TEST_FAULT_ONCE=FILE`` makes the fault fire once: not while FILE exists, and
FILE is created when it fires (a requeued job keeps its environment).
The loop reads its fault once per launch; each step costs one integer comparison.
"""
from __future__ import annotations

import os
import time

import torch

FAULT_ENV = "MEGATRON_CPT_TEST_FAULT"
ONCE_ENV = "MEGATRON_CPT_TEST_FAULT_ONCE"
FAULT_EXIT = 17
CRASH_EXIT = 1
SLOW_S = 1.0
SLOW_SAVE_S = 6.0


def planned(point: str) -> int | None:
    """The iteration at which ``point`` is set to fail, or None (always, outside tests)."""
    at = None
    for fault in os.environ.get(FAULT_ENV, "").split(","):
        name, _, iteration = fault.strip().partition("@")
        if name == point and iteration.isdigit():
            at = int(iteration)
    once = os.environ.get(ONCE_ENV)
    return None if at is None or (once and os.path.exists(once)) else at


def _fired() -> None:
    if once := os.environ.get(ONCE_ENV):
        open(once, "w").close()


def crash_if_planned(point: str, iteration: int) -> None:
    """Exit at once, without cleanup, as a killed node would."""
    if planned(point) == iteration:
        print(f"[test fault] {point} at iteration {iteration}: exiting {FAULT_EXIT}", flush=True)
        _fired()
        os._exit(FAULT_EXIT)


def delay_if_planned(point: str, iteration: int) -> None:
    """Sleep :data:`SLOW_SAVE_S` (a slow file system) where ``point`` is planned."""
    if planned(point) == iteration:
        print(f"[test fault] {point} at iteration {iteration}: waiting {SLOW_SAVE_S} s", flush=True)
        time.sleep(SLOW_SAVE_S)


@torch.no_grad()
def poison(model, point: str, iteration: int, rank: int) -> None:
    """``nan_weight`` / ``nan_grad`` at ``iteration``: a NaN into real training state."""
    if planned(point) != iteration or (point == "nan_weight" and rank != 0):
        return
    p = next(model.parameters())
    target = p if point == "nan_weight" else p.main_grad
    target.view(-1)[0] = float("nan")
    print(f"[test fault] {point} at iteration {iteration} on rank {rank}", flush=True)


def crash_rank_if_planned(iteration: int, rank: int, world_size: int) -> None:
    """The last rank dies at once (no cleanup, no checkpoint); the others find out through
    their next collective or the launcher (srun --kill-on-bad-exit)."""
    if rank == world_size - 1 and planned("crash_rank") == iteration:
        print(f"[test fault] crash_rank: rank {rank} exits {CRASH_EXIT} after iteration "
              f"{iteration}", flush=True)
        _fired()
        os._exit(CRASH_EXIT)


def hang_forever(point: str) -> None:
    """Block as a rank stuck in a dead collective would (until the watchdog ends the process)."""
    print(f"[test fault] {point}: this rank stops making progress", flush=True)
    while True:
        time.sleep(3600)
