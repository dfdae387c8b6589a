"""`plan`: it refuses what `train` refuses (the layout checks are preflight.check_layout)."""
from __future__ import annotations

from tests.bad_inputs import Ctx, Row
from tests.conftest import REPO

EXAMPLE_7B = REPO / "configs" / "train" / "qwen2.5-7b-tp2-fp8.yaml"  # TP2 x PP1


def _plan(*extra: str):
    def setup(ctx: Ctx) -> list[str]:
        return ["plan", "--config", str(EXAMPLE_7B), "--model", "qwen2.5-7b", *extra]
    return setup


ROWS = [
    # used to print a plan; the same line `train --check` gives at WORLD_SIZE=3
    Row("plan-gpus-not-a-multiple-of-tp-pp", _plan("--gpus", "3"),
        ("TP x PP = 2 x 1 = 2 does not divide the world size 3; launch a multiple of 2",)),
    # used to fall back to TP x PP silently
    Row("plan-gpus-zero", _plan("--gpus", "0"), ("--gpus must be >= 1, got 0",)),
]
