"""Resume on another layout (issue 14, item 3): real torchrun launches of the tiny model, 6
iterations each run, stopped by ``train.stop_after_iterations`` and relaunched on another layout.

- DP2 -> DP1 -> DP2 (``dp_reshardable``): losses equal to the uninterrupted run within 1e-5,
  every sample of the budget consumed exactly once, RNG restored exactly.
- TP2 (``dp_reshardable``) refused at TP1 with one line (exit 2), saved once more at TP2 with
  ``fully_reshardable``, then resumed at TP1; PP2 -> PP1 (``fully_reshardable``): losses within
  1e-4.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from test_train import CONFIG, _args, _ok, exit_status, launch, losses, records, sample_ids

ITERS, G = 6, 8  # budget.iterations, global batch (configs/train/tiny-cpu.yaml)
BUDGET = [f"budget.iterations={ITERS}"]
FULL = ["checkpoint.optimizer_format=fully_reshardable"]


@pytest.fixture(scope="module")
def uninterrupted(toy, tmp_path_factory) -> dict[int, float]:
    run_dir = tmp_path_factory.mktemp("layout") / "ref"
    _ok(launch(toy, 1, run_dir, BUDGET))
    return losses(run_dir)


def _stopped(toy, nproc: int, run_dir: Path, extra: list[str], after: int) -> None:
    launch(toy, nproc, run_dir, [*BUDGET, *extra, f"train.stop_after_iterations={after}"])
    assert exit_status(run_dir)["code"] == 42, exit_status(run_dir)


def _layout_events(run_dir: Path) -> list[tuple[int, str]]:
    return [(r["iteration"], r["details"]) for r in records(run_dir, "event")
            if r["event"] == "layout_change"]


def _layouts(run_dir: Path) -> list[tuple]:
    info = json.loads((run_dir / "run.json").read_text())
    return [(e["iteration"], e["tp"], e["pp"], e["dp"], e["world_size"], e["optimizer_format"])
            for e in info["layouts"]]


def _max_diff(got: dict[int, float], ref: dict[int, float]) -> float:
    assert sorted(got) == list(range(1, ITERS + 1)), got
    return max(abs(got[i] - ref[i]) for i in ref)


def test_dp2_to_dp1_to_dp2_continues_the_data_order_exactly(toy, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    _stopped(toy, 2, run_dir, [], after=2)
    ckpt = run_dir / "checkpoints" / "iter_0000002" / "trainer"
    states = [torch.load(ckpt / f"rank_{r:05d}.pt", weights_only=False) for r in (0, 1)]
    assert torch.equal(states[0]["torch"], states[1]["torch"])  # DP replicas: one RNG state
    assert states[0]["python"] == states[1]["python"]
    _stopped(toy, 1, run_dir, [], after=2)
    _ok(launch(toy, 2, run_dir, BUDGET))
    assert exit_status(run_dir)["code"] == 0
    diff = _max_diff(losses(run_dir), uninterrupted)
    print(f"DP2 -> DP1 -> DP2: max |loss - uninterrupted| over {ITERS} steps = {diff:.2e}")
    assert diff < 1e-5
    ids = sample_ids(run_dir)  # (iteration, sample id) from every DP rank of every launch
    assert sorted(ids) == [(i, s) for i in range(1, ITERS + 1) for s in range((i - 1) * G, i * G)]
    events = _layout_events(run_dir)
    assert [(it, d.split(":")[0]) for it, d in events] == [
        (2, "TP1 PP1 DP2 -> TP1 PP1 DP1"), (4, "TP1 PP1 DP1 -> TP1 PP1 DP2")], events
    assert all("dp_reshardable optimizer state resharded; RNG states restored exactly" in d
               for _, d in events), events
    dp = "dp_reshardable"
    assert _layouts(run_dir) == [(0, 1, 1, 2, 2, dp), (2, 1, 1, 1, 1, dp), (4, 1, 1, 2, 2, dp)]


def _check_refusal(toy, run_dir: Path) -> None:
    """``train --check`` at TP1 on a dp_reshardable TP2 checkpoint: one line, exit 2."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "megatron_cpt", "train", "--check",
                           *_args(toy, run_dir, BUDGET)], capture_output=True, text=True,
                          cwd=CONFIG.parents[2], timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and ("was saved at TP2 PP1 DP1 with checkpoint.optimizer_format="
                              "dp_reshardable, which resumes only at TP2 PP1 (any DP), not at TP1 "
                              "PP1 DP1") in err[0], err


@pytest.mark.parametrize("par", ["tp", "pp"])
def test_tp2_and_pp2_to_one_process_with_fully_reshardable(toy, uninterrupted, tmp_path, par):
    from megatron_cpt.training.config import TrainConfig
    from megatron_cpt.training.preflight import prepare

    run_dir, two = tmp_path / "run", [f"parallel.{par}=2"]
    if par == "tp":  # the default format cannot move to TP1: refused, then saved once as FULL
        _stopped(toy, 2, run_dir, two, after=2)
        _check_refusal(toy, run_dir)
    _stopped(toy, 2, run_dir, [*two, *FULL], after=3 if par == "pp" else 1)
    cfg = TrainConfig.load(CONFIG, _args(toy, run_dir, [*BUDGET, *FULL])[2:])
    assert prepare(cfg, world_size=1).resume.describe() == (
        f"resume at iteration 3 from iter_0000003 (checkpoints/latest); layout "
        f"{'TP2 PP1' if par == 'tp' else 'TP1 PP2'} DP1 -> TP1 PP1 DP1")
    _ok(launch(toy, 1, run_dir, [*BUDGET, *FULL]))
    diff = _max_diff(losses(run_dir), uninterrupted)
    print(f"{par.upper()}2 -> 1 ({FULL[0]}): max |loss - uninterrupted| = {diff:.2e}")
    assert diff < 1e-4
    (it, details), = _layout_events(run_dir)[-1:]
    assert it == 3 and "fully_reshardable optimizer state resharded" in details
    assert "per-rank RNG states not restored" in details and "re-seeded" in details
    assert _layouts(run_dir)[-1] == (3, 1, 1, 1, 1, "fully_reshardable")
    meta = json.loads((run_dir / "checkpoints" / "iter_0000003" / "metadata.json").read_text())
    assert meta["layout"]["world_size"] == 2 and meta["optimizer_format"] == "fully_reshardable"


def test_what_cannot_load_is_refused():
    """Unit checks of :func:`checkpointing.layout_problem` on metadata records."""
    from megatron_cpt.training.checkpointing import Layout, layout_problem

    dp2 = {"world_size": 2, "layout": Layout.of(1, 1, 2).to_dict(),
           "optimizer_format": "dp_reshardable"}
    assert layout_problem(dp2, Layout.of(1, 1, 1)) is None
    assert "resumes only at TP1 PP1 (any DP), not at TP2 PP1 DP1" in \
        layout_problem(dp2, Layout.of(2, 1, 1))
    full = {**dp2, "optimizer_format": "fully_reshardable"}
    assert layout_problem(full, Layout.of(2, 2, 1)) is None
    over = {**dp2, "layout": Layout.of(1, 1, 2, overlap_grad_reduce=True).to_dict()}
    assert layout_problem(over, Layout.of(1, 1, 40, overlap_grad_reduce=True)) is None
    assert "gradient buckets of 40000000 parameters, this launch uses 64000000" in \
        layout_problem(over, Layout.of(1, 1, 64, overlap_grad_reduce=True))
    old = {"world_size": 2}  # written before layouts were recorded
    assert layout_problem(old, Layout.of(1, 1, 2)) is None
    assert "before layouts were recorded" in layout_problem(old, Layout.of(1, 1, 1))
