"""Test-only fault injection, in one place: ``MEGATRON_CPT_TEST_FAULT=POINT@ITERATION``.

Points:
  * ``crash_in_save@N``: every rank exits :data:`FAULT_EXIT` between writing the weights of
    checkpoint N and committing its folder (checkpointing.py);
  * ``nan_loss@N``: the loss of iteration N reads as NaN (loop.py).
The loop reads its fault once per launch; each step costs one integer comparison.
"""
from __future__ import annotations

import os

FAULT_ENV = "MEGATRON_CPT_TEST_FAULT"
FAULT_EXIT = 17


def planned(point: str) -> int | None:
    """The iteration at which ``point`` is set to fail, or None (always, outside tests)."""
    name, _, iteration = os.environ.get(FAULT_ENV, "").partition("@")
    return int(iteration) if name == point and iteration.isdigit() else None


def crash_if_planned(point: str, iteration: int) -> None:
    """Exit at once, without cleanup, as a killed node would."""
    if planned(point) == iteration:
        print(f"[test fault] {point} at iteration {iteration}: exiting {FAULT_EXIT}", flush=True)
        os._exit(FAULT_EXIT)
