"""benchmarks/gpu_check.sh: the rehearsal (every step of the GPU check on CPU, tiny shapes)
passes with sensible numbers; a step that cannot run is recorded and fails the script."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
STEPS = ["environment", "fp32_device_vs_cpu", "bf16_sigterm_resume", "throughput",
         "convert_verify", "eval_run", "train_async_save"]


def gpu_check(tmp_path: Path, *args: str, timeout: int = 600) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), "--rehearsal", "--out", str(out), "--work",
                           str(tmp_path / "work"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, env={**os.environ, "PYTHON": sys.executable})
    jsonl = out / "gpu_check.jsonl"
    records = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.is_file() else []
    return proc, records


def _failures(proc: subprocess.CompletedProcess, records: list[dict]) -> str:
    lines = [f"gpu_check.sh exited {proc.returncode}; stdout:\n{proc.stdout[-2000:]}\n"
             f"stderr:\n{proc.stderr[-2000:]}"]
    for r in records:
        if not r["ok"]:
            lines.append(f"--- step {r['step']} failed: {r.get('error')}\n{r.get('log_tail', '')[-2500:]}")
    return "\n".join(lines)


def test_rehearsal_every_step_ok_with_sensible_numbers(tmp_path):
    t0 = time.monotonic()
    proc, records = gpu_check(tmp_path)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0 and records and all(r["ok"] for r in records), _failures(proc, records)
    assert [r["step"] for r in records] == STEPS
    r = {rec["step"]: rec for rec in records}
    assert all(rec["rehearsal"] and rec["seconds"] > 0 for rec in records)

    fp32 = r["fp32_device_vs_cpu"]  # both on CPU here: the same kernels
    assert fp32["max_abs_loss_diff"] < 1e-4 and fp32["loss_last"] < fp32["loss_first"]

    bf16 = r["bf16_sigterm_resume"]  # a real SIGTERM, exit 42, relaunch: bit-identical losses
    assert bf16["max_abs_loss_diff"] == 0.0 and bf16["identical_iterations"] == bf16["iterations"]
    assert 1 <= bf16["stopped_at"] < bf16["iterations"] and bf16["resumed_at"] == [bf16["stopped_at"]]

    configs = r["throughput"]["configurations"]
    assert {(c["model"], c["attention_backend"], c["recompute"]) for c in configs} == {
        (m, a, rc) for m in ("tiny-a", "tiny-b") for a in ("SDPAttention", "DotProductAttention")
        for rc in (None, "selective")}
    assert all(c["tokens_per_s_per_gpu"] > 0 and c["tflops_per_gpu"] > 0 for c in configs)

    verify = r["convert_verify"]  # bf16 on both sides; a wrong mapping gives O(1)
    assert verify["dtype"] == "bfloat16" and verify["max_rel_diff"] <= verify["tolerance"] <= 0.05
    assert abs(verify["loss_hf"] - verify["loss_mcore"]) < 0.05

    ev = r["eval_run"]
    assert ev["n_test"] == ev["limit"] and 0.0 <= ev["acc_test"] <= 1.0
    assert ev["answer_ppl_test"] > 1.0 and ev["valid_loss"] > 0

    train = r["train_async_save"]
    assert train["checkpoints"] == ["iter_0000002"] and train["checkpoint_dtype"] == "bfloat16"
    assert len(train["losses"]) == 3 and train["tokens_per_s"] > 0

    with tarfile.open(tmp_path / "out" / "gpu_check_logs.tar.gz") as tar:
        names = tar.getnames()
    assert "./logs/bf16_sigterm_resume/interrupted.log" in names and "./bf16-cut/metrics.jsonl" in names
    print(f"gpu_check.sh --rehearsal: {len(records)} steps ok in {seconds:.0f} s")


def test_steps_that_cannot_run_are_recorded_and_fail_the_script(tmp_path):
    """A budget too small for any step: every step still gets a record, the exit status is 1."""
    proc, records = gpu_check(tmp_path, "--budget-s", "1", timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert [r["step"] for r in records] == STEPS
    for r in records:
        assert r["ok"] is False and r["error"].startswith("skipped: the 1 s budget"), r
    assert "0/7 steps ok" in proc.stdout


@pytest.mark.parametrize("rc,error", [(124, "timed out after 5 s"), (3, "exited 3 without a record")])
def test_a_killed_step_gets_a_failure_record_with_its_log_tail(tmp_path, rc, error):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "throughput.log").write_text("...\nRuntimeError: CUDA out of memory\n")
    jsonl = tmp_path / "gpu_check.jsonl"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "finish", "throughput",
                    "--work", str(tmp_path), "--rc", str(rc), "--limit", "5", "--seconds", "5.2",
                    "--jsonl", str(jsonl)], check=True, capture_output=True)
    (record,) = map(json.loads, jsonl.read_text().splitlines())
    assert record["step"] == "throughput" and record["ok"] is False and record["seconds"] == 5.2
    assert record["error"] == error and record["exit_code"] == rc
    assert record["log_tail"].endswith("CUDA out of memory\n")


def test_a_step_stopped_by_its_timeout_still_writes_its_record(tmp_path):
    """`timeout` sends SIGTERM: the step stops (killing what it started) and says so."""
    cmd = ["timeout", "1", sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "run",
           "environment", "--work", str(tmp_path), "--rehearsal"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 124, proc.stdout + proc.stderr
    record = json.loads((tmp_path / "records" / "environment.json").read_text())
    assert record["ok"] is False
    assert record["error"].startswith("stopped by signal 15 (the step's timeout)"), record
