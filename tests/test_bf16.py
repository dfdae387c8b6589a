"""bf16 — the precision of every study cell — on CPU, checkpoints included (issue 24, item 1).

Until the model cast every parameter to the training dtype, the local spec's RMSNorm stayed
fp32 beside bf16 weights; the optimizers then looked up the wrong state for a parameter, so a
bf16 run crashed at its first save (or, where sizes coincided, saved moments under the wrong
names). These tests fail on that code:

- Adam pairing: after 3 steps each parameter's moments (found from the model parameter, as a
  checkpoint finds them) equal an independent ``torch.optim.AdamW`` fed the same gradients; then
  the checkpoint is loaded at another TP (or the same, for ``dp_reshardable``) and compared again.
- SIGTERM + relaunch: a bf16 run saves at iteration 5, is sent SIGTERM near iteration 8, is
  relaunched with the same command, and its losses equal the uninterrupted bf16 run's exactly,
  at TP2 and PP2 with the distributed optimizer (both formats) and with the plain optimizer.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import _free_port
from test_train import _args, _cmd, _ok, exit_status, launch, losses, records

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "helpers" / "adam_pairing.py"
BIN = Path(sys.executable).parent
ITERS = 10
# bf16; a checkpoint every 5 iterations (8 x 64 tokens each); 10 iterations
BF16 = ["precision.dtype=bfloat16", f"budget.iterations={ITERS}", "checkpoint.every_tokens=2560"]


def _pairing(spec: dict, nproc: int) -> list[dict]:
    path = Path(spec["work"]) / f"{spec['phase']}.json"
    path.write_text(json.dumps(spec))
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port",
           str(_free_port()), str(HELPER), str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [json.loads((path.parent / f"{spec['phase']}.rank{r}.result.json").read_text())
            for r in range(nproc)]


@pytest.mark.parametrize("dist_opt,fmt,load_tp", [
    # the plain optimizer's state is keyed per parameter: any layout loads it (the trainer's
    # layout check reads the format, so the checkpoint says fully_reshardable)
    (True, "fully_reshardable", 2), (True, "dp_reshardable", 1), (False, "fully_reshardable", 2)],
    ids=["distopt-fully_reshardable-tp1to2", "distopt-dp_reshardable", "plain-tp1to2"])
def test_each_parameter_keeps_its_own_adam_state(toy, tmp_path, dist_opt, fmt, load_tp):
    spec = {"tp": 1, "toy": str(toy["pretrained"].parent), "work": str(tmp_path),
            "distributed_optimizer": dist_opt, "format": fmt}
    trained = _pairing({**spec, "phase": "train"}, 1)
    loaded = _pairing({**spec, "phase": "load", "tp": load_tp}, load_tp)
    assert len(trained) == 1 and len(loaded) == load_tp
    for r in trained + loaded:  # 2 moments x every parameter of the tiny model, each rank
        assert r["checked"] >= 40 and r["max_rel_err"] < 1e-5, r
    print(f"bf16 {fmt} {'distributed' if dist_opt else 'plain'} optimizer: "
          f"{trained[0]['checked']} moments equal AdamW's; after a load at TP{load_tp}: "
          f"max relative error {max(r['max_rel_err'] for r in loaded):.1e}")


def _signal_near(toy, nproc: int, run_dir: Path, extra: list[str], after: int) -> dict:
    """Launch, send SIGTERM to one rank once ``after`` iterations are logged (the steps from
    ``after`` on are slowed by a second so the signal lands mid-run); the verdict."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEGATRON_CPT_TEST_FAULT": f"slow_steps@{after}"}
    import psutil

    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(_cmd(nproc) + _args(toy, run_dir, extra), env=env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
        metrics, deadline = run_dir / "metrics.jsonl", time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and sum('"train"' in line for line in
                                        metrics.read_text().splitlines()) >= after:
                break
            time.sleep(0.1)
        target = psutil.Process(proc.pid).children()[-1] if nproc > 1 else proc
        os.kill(target.pid, signal.SIGTERM)  # one rank: the others learn it by all-reduce
        proc.wait(timeout=300)
        log.seek(0)
        out = log.read()
    status = exit_status(run_dir)
    assert status["code"] == 42, out[-3000:]
    return status


_refs: dict[str, dict[int, float]] = {}


def _uninterrupted(toy, tmp_path_factory, key: str, nproc: int, extra: list[str]) -> dict:
    if key not in _refs:
        run_dir = tmp_path_factory.mktemp("bf16") / f"ref-{key}"
        _ok(launch(toy, nproc, run_dir, extra))
        _refs[key] = losses(run_dir)
    return _refs[key]


@pytest.mark.parametrize("nproc,layout,fmt", [
    (2, ["parallel.tp=2"], "dp_reshardable"),
    (2, ["parallel.tp=2"], "fully_reshardable"),
    (2, ["parallel.pp=2"], "dp_reshardable"),
    (1, ["parallel.distributed_optimizer=false"], "dp_reshardable"),
], ids=["tp2-distopt", "tp2-distopt-fully_reshardable", "pp2-distopt", "plain-optimizer"])
def test_bf16_sigterm_and_relaunch_equal_the_uninterrupted_run(toy, tmp_path, tmp_path_factory,
                                                               nproc, layout, fmt):
    extra = [*BF16, *layout, f"checkpoint.optimizer_format={fmt}"]
    # the optimizer format changes what is written, never the losses: one reference per layout
    ref = _uninterrupted(toy, tmp_path_factory, "-".join(layout), nproc,
                         [*BF16, *layout])
    run_dir = tmp_path / "run"
    status = _signal_near(toy, nproc, run_dir, extra, after=7)
    stopped = status["iteration"]
    assert 7 <= stopped < ITERS, status
    ck = run_dir / "checkpoints"
    assert (ck / "latest").read_text().strip() == f"iter_{stopped:07d}"
    assert (ck / "iter_0000005").is_dir()
    meta = json.loads((ck / f"iter_{stopped:07d}" / "metadata.json").read_text())
    assert meta["dtype"] == "bfloat16" and meta["optimizer_format"] == fmt
    _ok(launch(toy, nproc, run_dir, extra))  # the very same command
    assert exit_status(run_dir)["code"] == 0
    assert [r["iteration"] for r in records(run_dir, "event") if r["event"] == "resume"] == [stopped]
    got = losses(run_dir)
    assert sorted(got) == list(range(1, ITERS + 1))
    assert got == ref  # exact, every iteration
    print(f"bf16 {' '.join(layout)} {fmt}: SIGTERM at iteration {stopped}; "
          f"{ITERS}/{ITERS} losses bit-identical to the uninterrupted run")
