"""Test-only fault injection, in one place: ``MEGATRON_CPT_TEST_FAULT=POINT@ITERATION``.

Points:
  * ``crash_in_save@N``: every rank exits :data:`FAULT_EXIT` between writing the weights of
    checkpoint N and committing its folder (checkpointing.py);
  * ``nan_loss@N``: the loss of iteration N reads as NaN (loop.py);
  * ``nan_weight@N``: rank 0 writes a NaN into its first weight before iteration N's forward
    pass (the weights themselves go bad, as after an overflowed update);
  * ``nan_grad@N``: every rank writes a NaN into its first gradient after iteration N's
    backward pass and gradient all-reduce (as an overflowed reduction would).
  * ``hang@N``: the last rank stops (sleeps) before iteration N, once per run folder: only
    while ``RUN/hang/`` does not exist yet, so the retried launch runs through (loop.py);
  * ``slow_rank@R``: global rank R sleeps :data:`SLOW_S` before each step (a straggler);
  * ``slow_steps@N``: every iteration from N on takes a second longer (loop.py), so a test
    can act on a launch that is still running.
The loop reads its fault once per launch; each step costs one integer comparison.
"""
from __future__ import annotations

import os
import time

import torch

FAULT_ENV = "MEGATRON_CPT_TEST_FAULT"
FAULT_EXIT = 17
SLOW_S = 1.0


def planned(point: str) -> int | None:
    """The iteration at which ``point`` is set to fail, or None (always, outside tests)."""
    name, _, iteration = os.environ.get(FAULT_ENV, "").partition("@")
    return int(iteration) if name == point and iteration.isdigit() else None


def crash_if_planned(point: str, iteration: int) -> None:
    """Exit at once, without cleanup, as a killed node would."""
    if planned(point) == iteration:
        print(f"[test fault] {point} at iteration {iteration}: exiting {FAULT_EXIT}", flush=True)
        os._exit(FAULT_EXIT)


@torch.no_grad()
def poison(model, point: str, iteration: int, rank: int) -> None:
    """``nan_weight`` / ``nan_grad`` at ``iteration``: a NaN into real training state."""
    if planned(point) != iteration or (point == "nan_weight" and rank != 0):
        return
    p = next(model.parameters())
    target = p if point == "nan_weight" else p.main_grad
    target.view(-1)[0] = float("nan")
    print(f"[test fault] {point} at iteration {iteration} on rank {rank}", flush=True)
def hang_forever(point: str) -> None:
    """Block as a rank stuck in a dead collective would (until the watchdog ends the process)."""
    print(f"[test fault] {point}: this rank stops making progress", flush=True)
    while True:
        time.sleep(3600)
