"""Trainer end to end on CPU: real `torchrun` processes (gloo) on the tiny model.

Launches (each one process group): 1 process x 30 steps; TP2, PP2, TP2xPP2 x 4 steps;
DP2 x 30 steps (the reference of the preemption test); DP2 stopped by SIGTERM + relaunch;
1 process crashed inside a checkpoint save + relaunch.
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

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "train" / "tiny-cpu.yaml"
BIN = Path(sys.executable).parent
TOL = 1e-4  # fp32, different reduction orders


def _cmd(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "megatron_cpt", "train"]
    return [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}",
            "-m", "megatron_cpt", "train"]


def _args(toy, run_dir: Path, extra: list[str]) -> list[str]:
    from megatron_cpt.training.toy import toy_overrides

    return ["--config", str(CONFIG), *toy_overrides(toy, run_dir), "logging.log_sample_ids=true",
            *extra]


def launch(toy, nproc: int, run_dir: Path, extra: list[str] = (), env: dict | None = None,
           timeout: int = 300) -> subprocess.CompletedProcess:
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    # files, not pipes: a rank killed mid-save can leave the checkpoint writer's forked
    # child holding a pipe open, and the parent would wait for EOF forever
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        rc = subprocess.run(_cmd(nproc) + _args(toy, run_dir, list(extra)), env=e, cwd=ROOT,
                            stdout=out, stderr=err, timeout=timeout).returncode
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess([], rc, out.read(), err.read())


def records(run_dir: Path, kind: str = "train") -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


def losses(run_dir: Path) -> dict[int, float]:
    """Last logged loss per iteration (a relaunch may redo iterations after a crash)."""
    return {r["iteration"]: r["loss"] for r in records(run_dir)}


def exit_status(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "exit_status.json").read_text())


def sample_ids(run_dir: Path) -> list[tuple[int, int]]:
    out = []
    for f in sorted((Path(run_dir) / "debug").glob("samples_dp*.jsonl")):
        for rec in map(json.loads, f.read_text().splitlines()):
            out += [(rec["iteration"], i) for i in rec["ids"]]
    return out


def _ok(proc: subprocess.CompletedProcess, code: int = 0) -> None:
    assert proc.returncode == code, proc.stdout[-3000:] + proc.stderr[-5000:]


_cache: dict[str, Path] = {}


def run_once(key: str, toy, tmp_path_factory, nproc: int, extra: list[str]) -> Path:
    if key not in _cache:
        run_dir = tmp_path_factory.getbasetemp() / f"run-{key}"
        proc = launch(toy, nproc, run_dir, extra)
        _ok(proc, 0 if not any("stop_after" in x for x in extra) or nproc > 1 else 42)
        _cache[key] = run_dir
    return _cache[key]


@pytest.fixture(scope="session")
def single(toy, tmp_path_factory) -> Path:
    return run_once("single", toy, tmp_path_factory, 1, [])


@pytest.fixture(scope="session")
def dp2(toy, tmp_path_factory) -> Path:
    # validation every 5 iterations (forward only; it must not change the training losses)
    return run_once("dp2", toy, tmp_path_factory, 2, ["validation.interval_tokens=2560"])


def test_30_steps_loss_decreases_and_step0_matches_transformers(single, toy):
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    loss = losses(single)
    assert sorted(loss) == list(range(1, 31))
    assert loss[30] < loss[1] - 1.0, loss
    assert sum(loss[i] for i in range(26, 31)) < sum(loss[i] for i in range(1, 6))
    # step 0 (the loss of iteration 1, before any update) == transformers on the same batch
    first = json.loads((single / "debug" / "samples_dp0.jsonl").read_text().splitlines()[0])
    tokens = torch.tensor(first["tokens"]).reshape(-1, 64)
    labels = torch.tensor(first["labels"]).reshape(-1, 64)
    hf = AutoModelForCausalLM.from_pretrained(str(toy["hf"]), dtype=torch.float32,
                                              attn_implementation="eager").eval()
    with torch.no_grad():
        logits = hf(tokens).logits
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).item()
    assert abs(loss[1] - ref) < TOL, (loss[1], ref)
    # metrics, validation, checkpoints and retention
    rec = records(single)[-1]
    for key in ("iteration", "tokens", "flops", "loss", "lr", "grad_norm", "step_time_s",
                "tokens_per_s", "tflops_per_gpu", "mfu"):
        assert key in rec
    assert rec["tokens"] == 30 * 8 * 64
    assert {r["prefix"] for r in records(single, "valid")} == {"legal", "general"}
    ck = single / "checkpoints"
    assert (ck / "latest").read_text().strip() == "iter_0000030"
    assert sorted(p.name for p in ck.glob("iter_*")) == ["iter_0000020", "iter_0000030"]
    meta = json.loads((ck / "iter_0000030" / "metadata.json").read_text())
    assert meta["iteration"] == 30 and meta["consumed_samples"] == 240
    assert meta["tokens"] == 30 * 512 and meta["flops"] == pytest.approx(rec["flops"])
    assert len(meta["config_hash"]) == 16
    assert exit_status(single)["code"] == 0
    ids = sample_ids(single)
    assert sorted(i for _, i in ids) == list(range(240))


@pytest.mark.parametrize("nproc,par", [(2, ["parallel.tp=2"]), (2, ["parallel.pp=2"]),
                                       (4, ["parallel.tp=2", "parallel.pp=2"])],
                         ids=["tp2", "pp2", "tp2xpp2"])
def test_model_parallel_losses_equal_single_process(single, toy, tmp_path, nproc, par):
    """4 steps each. TP2 also checks the NaN stop (a NaN injected at step 5: exit 3, checkpoint
    of step 4, TensorBoard files); PP2 and TP2xPP2 stop by stop_after_iterations (exit 42)."""
    steps = 4
    run_dir = tmp_path / "run"
    if par == ["parallel.tp=2"]:
        proc = launch(toy, nproc, run_dir, [*par, "logging.tensorboard=true"],
                      env={"MEGATRON_CPT_TEST_FAULT": f"nan_loss@{steps + 1}"})
        assert exit_status(run_dir) == {"code": 3, "iteration": steps, "iterations": 30,
                                        "reason": "nonfinite"}, proc.stderr[-4000:]
        assert f"non-finite loss nan at iteration {steps + 1}" in proc.stderr
        assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    else:
        proc = launch(toy, nproc, run_dir, [*par, f"train.stop_after_iterations={steps}"])
        assert exit_status(run_dir)["code"] == 42, proc.stderr[-4000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"iter_{steps:07d}"
    got, ref = losses(run_dir), losses(single)
    assert sorted(got) == list(range(1, steps + 1))
    diffs = [abs(got[i] - ref[i]) for i in got]
    print(f"{par}: max |loss - single| over {steps} steps = {max(diffs):.2e}")
    assert max(diffs) < TOL, (got, ref)
    gn = {r["iteration"]: r["grad_norm"] for r in records(run_dir)}
    gn_ref = {r["iteration"]: r["grad_norm"] for r in records(single)}
    assert max(abs(gn[i] - gn_ref[i]) for i in gn) < 1e-3, (gn, gn_ref)


def test_data_parallel_distributed_optimizer_equals_single_process(single, dp2):
    got, ref = losses(dp2), losses(single)
    assert sorted(got) == list(range(1, 31))
    diffs = [abs(got[i] - ref[i]) for i in range(1, 9)]
    print(f"DP2: max |loss - single| over 8 steps = {max(diffs):.2e}")
    assert max(diffs) < TOL
    assert sorted(i for _, i in sample_ids(dp2)) == list(range(240))
    valid = [(r["iteration"], r["prefix"]) for r in records(dp2, "valid")]
    assert valid == [(i, p) for i in range(5, 31, 5) for p in ("legal", "general")]


def _signal_one_worker(toy, run_dir: Path, after_records: int, log) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cmd(2) + _args(toy, run_dir, []), env=env, cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    import psutil

    deadline = time.time() + 240
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and sum('"train"' in line for line in
                                    metrics.read_text().splitlines()) >= after_records:
            break
        time.sleep(0.2)
    workers = psutil.Process(proc.pid).children()
    assert len(workers) == 2
    os.kill(workers[-1].pid, signal.SIGTERM)  # one rank only: the others learn it by all-reduce
    return proc


def test_sigterm_then_relaunch_reproduces_loss_sequence_exactly(toy, dp2, tmp_path):
    run_dir = tmp_path / "run"
    with tempfile.TemporaryFile("w+") as log:
        proc = _signal_one_worker(toy, run_dir, after_records=5, log=log)
        proc.wait(timeout=300)
        log.seek(0)
        out = log.read()
    status = exit_status(run_dir)
    assert status["code"] == 42 and "exitcode  : 42" in out, out[-3000:]
    stopped = status["iteration"]
    assert 5 <= stopped < 30
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"iter_{stopped:07d}"
    relaunch = launch(toy, 2, run_dir)  # the very same command
    _ok(relaunch)
    assert exit_status(run_dir)["code"] == 0
    resumed = [r for r in records(run_dir, "event") if r["event"] == "resume"]
    assert [r["iteration"] for r in resumed] == [stopped]
    assert losses(run_dir) == losses(dp2)  # exact, every iteration
    print(f"SIGTERM at iteration {stopped}; 30/30 losses bit-identical to the uninterrupted run")
    ids = sample_ids(run_dir)
    assert sorted(i for _, i in ids) == list(range(240))  # none skipped, none repeated
    assert ids == sample_ids(dp2)


def test_crash_during_checkpoint_save_keeps_previous_and_resumes(toy, single, tmp_path):
    run_dir = tmp_path / "run"
    crashed = launch(toy, 1, run_dir, env={"MEGATRON_CPT_TEST_FAULT": "crash_in_save@20"})
    assert crashed.returncode == 17, crashed.stderr[-3000:]
    ck = run_dir / "checkpoints"
    assert (ck / "latest").read_text().strip() == "iter_0000010"
    assert (ck / ".iter_0000020.tmp").is_dir() and not (ck / "iter_0000020").exists()
    from megatron_cpt.checkpoint import store

    assert store.read_metadata(ck / "iter_0000010")["iteration"] == 10
    relaunch = launch(toy, 1, run_dir)
    _ok(relaunch)
    assert not (ck / ".iter_0000020.tmp").exists()
    resumed = [r for r in records(run_dir, "event") if r["event"] == "resume"]
    assert [r["details"] for r in resumed] == ["iter_0000010"]
    assert losses(run_dir) == losses(single)

