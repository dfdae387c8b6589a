"""The run folder contract (megatron_cpt/run_folder.py): files, exit codes, the requeue
decision in Python and as rendered into the sbatch scripts, the MASTER_PORT formula."""
from __future__ import annotations

import os
import subprocess
from itertools import product
from pathlib import Path

import pytest

from megatron_cpt import run_folder as rf
from megatron_cpt.errors import UsageError
from megatron_cpt.run_folder import RunFolder

ROOT = Path(__file__).resolve().parents[1]


def test_exit_status_and_run_info_round_trip(tmp_path):
    run = RunFolder(tmp_path / "run")
    assert run.exit_status() is None and run.run_info() is None and run.latest_name() is None
    run.write_run_info({"config_hash": "abc", "budget": {"iterations": 5}})
    run.write_exit_status(rf.EXIT_REQUEUE, 3, 5)
    assert run.run_info()["config_hash"] == "abc"
    assert run.exit_status() == {"code": 42, "iteration": 3, "iterations": 5, "reason": "requeue"}
    assert not list(run.path.glob("*.tmp"))  # written through a rename
    assert [rf.exit_state(c) for c in (0, 3, 4, 42, 2, 1, None)] == \
        ["DONE", "NONFINITE", "HUNG", "STOPPED", "FAILED", "FAILED", "FAILED"]
    run.write_exit_status(rf.EXIT_HANG, 7, 9)
    assert run.exit_status()["reason"] == "hang"
    assert run.hang_report(3) == run.path / "hang" / "rank_00003.txt"
    run.clear_exit_status()
    assert run.exit_status() is None
    run.write_refused("bad latest")  # no previous verdict: a refusal creates nothing
    assert run.exit_status() is None
    run.write_running(3, 5)
    assert run.exit_status() == {"code": None, "iteration": 3, "iterations": 5, "reason": "running"}
    run.write_refused("bad latest")
    assert run.exit_status() == {"code": 2, "iteration": 3, "iterations": 5, "reason": "usage",
                                 "message": "bad latest"}


def test_metrics_skip_a_line_cut_by_a_kill_and_eval_results_by_iteration(tmp_path):
    run = RunFolder(tmp_path)
    run.metrics_path.write_text('{"kind": "train", "iteration": 1}\n{"kind": "tra')
    assert run.metrics() == [{"kind": "train", "iteration": 1}]
    run.eval_dir.mkdir()
    for it in (20, 0):
        run.eval_result(it).write_text("{}")
        run.eval_questions(it).write_text("")
    (run.eval_dir / "notes.json").write_text("{}")
    assert list(run.eval_results()) == [0, 20]
    assert run.eval_result(20).name == "0000020.json"


def test_typed_config_of_a_run(tmp_path):
    run = RunFolder(tmp_path)
    with pytest.raises(UsageError, match="not a training run folder"):
        run.train_config()
    # a run written before `eval:` became `validation:`; seq_length from TrainConfig's default
    run.write_config({"run_dir": str(tmp_path), "eval": {"iters": 7}})
    cfg = run.train_config()
    assert cfg.validation.iters == 7 and cfg.data.seq_length == 4096


def test_training_config_eval_section_is_renamed(tmp_path):
    from megatron_cpt.training.config import TrainConfig

    with pytest.raises(UsageError, match="now called `validation:`"):
        TrainConfig.load(ROOT / "configs" / "train" / "tiny-cpu.yaml", ["eval.iters=3"])


def test_requeue_decision_and_its_sbatch_rendering_agree(tmp_path):
    """The bash the sbatch scripts run makes the decision requeue_decision makes (restarts,
    earlier retried crashes of this job in launches.jsonl), records it, and exits 1 when
    SLURM refuses the requeue. The real SLURM runs of this are in tests/test_slurm.py."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "scontrol.args"
    (bindir / "scontrol").write_text(f'#!/bin/bash\necho "$@" > {record}\nexit "${{REFUSE:-0}}"\n')
    (bindir / "scontrol").chmod(0o755)
    run = rf.RunFolder(tmp_path / "run")
    script = (f"code=$1\nMAX_REQUEUES=2\nMAX_FAILURES=1\nRUN_DIR={run.path}\n"
              + rf.requeue_shell("job") + "\n")
    other_job = rf.launch_record("76", 0, 1, rf.RETRY)  # another job's crashes do not count
    for code in (0, 1, 2, 3, 5, 42, 137):
        for restarts, failures, refuse in product((0, 2, 3), (0, 1), (0, 1)):
            record.unlink(missing_ok=True)
            run.launches_path.unlink(missing_ok=True)
            for _ in range(failures):
                run.record_launch(rf.launch_record("77", 0, 1, rf.RETRY))
            run.record_launch(other_job)
            decision = rf.requeue_decision(code, restarts, 2, run.failures("77"), 1)
            env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "REFUSE": str(refuse),
                   "SLURM_RESTART_COUNT": str(restarts), "SLURM_JOB_ID": "77"}
            proc = subprocess.run(["bash", "-c", script, "sbatch", str(code)], env=env,
                                  capture_output=True, text=True)
            case = (code, restarts, failures, refuse, proc.stderr)
            asked = decision in (rf.REQUEUE, rf.RETRY)
            assert (record.is_file() and record.read_text().split() == ["requeue", "77"]) == asked, case
            want_rc = {rf.FINISHED: 0, rf.GIVE_UP: 1, rf.FAILED: code}.get(decision, refuse)
            assert proc.returncode == want_rc, case
            last = run.launches()[-1]
            want = (rf.FAILED, "scontrol requeue refused") if asked and refuse else (decision, None)
            assert last["decision"] == want[0] and (want[1] is None or last["note"] == want[1]), case
            assert last["code"] == code and last["job"] == "77" and last["restart"] == restarts, case
            assert last["reason"] == (rf.EXIT_CODES[code].reason if code in rf.EXIT_CODES
                                      else "crash"), case


def test_master_port_formula_is_shared(monkeypatch):
    from megatron_cpt.runtime.distributed import read_dist_env

    for var in ("RANK", "WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert read_dist_env().master_port == rf.master_port(123456) == 20000 + 123456 % 20000
    shell = subprocess.run(["bash", "-c", f'SLURM_JOB_ID=123456; echo "{rf.MASTER_PORT_SHELL}"'],
                           capture_output=True, text=True, check=True).stdout
    assert int(shell) == rf.master_port(123456)
