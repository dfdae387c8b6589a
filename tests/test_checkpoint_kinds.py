"""Checkpoint kinds and async saves (issue 14a), on real `torchrun` runs of the tiny model.

* 1 process, async + fully parallel, evaluation grid every 10 iterations: losses equal the
  sync run's; retention turns iter_10 into a weights-only evaluation checkpoint, which resume
  refuses and `eval run`, `convert mcore-to-hf` and `convert mcore-to-nemo` (read back by NeMo
  itself) read like any checkpoint.
* DP2 async, the write of checkpoint 20 slowed (test fault `slow_save`): SIGTERM mid-write waits
  for the write, commits, saves and exits 42; `kill -9` of every process mid-write leaves
  `latest` on iter_10. Both relaunches reproduce the uninterrupted loss sequence exactly, and
  `latest` never names an uncommitted folder while the runs go on.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from test_train import (ROOT, _args, _cmd, _marked, _ok, dp2, exit_status, launch,  # noqa: F401
                        losses, records, sample_ids, single)

ASYNC = ["checkpoint.async_save=true", "checkpoint.fully_parallel=true"]
MID_WRITE = {"MEGATRON_CPT_TEST_FAULT": "slow_save@20,slow_steps@20"}


def _meta(ckpt: Path) -> dict:
    return json.loads((ckpt / "metadata.json").read_text())


@pytest.fixture(scope="module")
def async_run(toy, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("kinds") / "run"
    _ok(launch(toy, 1, run_dir, [*ASYNC, "checkpoint.keep_every_tokens=5120"]))
    return run_dir


def test_async_fully_parallel_run_keeps_weights_only_evaluation_checkpoints(async_run, single):
    from megatron_cpt.errors import UsageError
    from megatron_cpt.training import checkpointing

    assert losses(async_run) == losses(single)  # the background writes change nothing
    ck = async_run / "checkpoints"
    assert (ck / "latest").read_text().strip() == "iter_0000030"
    assert sorted(p.name for p in ck.glob("iter_*")) == \
        ["iter_0000010", "iter_0000020", "iter_0000030"]
    evaluation = ck / "iter_0000010"
    assert _meta(evaluation)["kind"] == "evaluation" and _meta(evaluation)["iteration"] == 10
    assert sorted(p.name for p in evaluation.iterdir()) == \
        ["metadata.json", "model.yaml", "tokenizer", "weights"]
    for it in (20, 30):
        resume = ck / f"iter_{it:07d}"
        assert _meta(resume)["kind"] == "resume"
        assert {"weights", "optimizer", "trainer"} <= {p.name for p in resume.iterdir()}
        assert checkpointing.checkpoint_problem(resume, 1) is None
    size = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())  # noqa: E731
    print(f"evaluation checkpoint {size(evaluation) / 1e6:.2f} MB, resume "
          f"{size(ck / 'iter_0000030') / 1e6:.2f} MB")
    assert size(evaluation) * 3 < size(ck / "iter_0000030")
    assert checkpointing.checkpoint_problem(evaluation, 1).startswith("is an evaluation checkpoint")
    with pytest.raises(UsageError, match="iter_0000010 is an evaluation checkpoint .* the newest "
                                         "complete checkpoint is iter_0000030"):
        checkpointing.plan_resume(async_run, 1, resume_from="iter_0000010")
    committed = [r["details"] for r in records(async_run, "event") if r["event"] == "checkpoint"]
    assert committed == ["iter_0000010", "iter_0000020", "iter_0000030"]


def test_retention_finishes_an_interrupted_demotion(tmp_path, async_run):
    """A crash between the metadata rewrite and the removal of optimizer state: the next
    retention removes it."""
    import shutil

    from megatron_cpt.training import checkpointing

    ckpt = tmp_path / "iter_0000030"
    shutil.copytree(async_run / "checkpoints" / "iter_0000030", ckpt)
    meta = _meta(ckpt)
    (ckpt / "metadata.json").write_text(json.dumps({**meta, "kind": "evaluation"}))
    checkpointing.drop_optimizer_state(ckpt)
    assert not (ckpt / "optimizer").exists() and not (ckpt / "trainer").exists()
    assert _meta(ckpt)["kind"] == "evaluation" and _meta(ckpt)["scheduler"] == meta["scheduler"]


def test_weights_only_checkpoint_through_eval_and_both_exports(async_run, toy, tmp_path):
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    ckpt = async_run / "checkpoints" / "iter_0000010"
    exams = [str(REPO / "eval/exams/legal.jsonl")]
    out = run_cli("eval", "run", "--run-dir", str(async_run), "--exams", *exams, "--limit", "4",
                  "--num-fewshot", "1", "--valid-sequences", "2")
    assert "scored 4 checkpoint(s): [0, 10, 20, 30]" in out.stdout, out.stdout
    rec = json.loads((async_run / "eval" / "0000010.json").read_text())
    assert rec["iteration"] == 10 and rec["checkpoint"] == str(ckpt)
    assert rec["exams"]["legal"]["test"]["n"] == 4 and rec["valid"]["legal"]["loss"] > 0

    hf, nemo = tmp_path / "hf", tmp_path / "nemo"
    run_cli("convert", "mcore-to-hf", "--ckpt", str(ckpt), "--out", str(hf))
    run_cli("convert", "mcore-to-nemo", "--ckpt", str(ckpt), "--out", str(nemo))
    dcp_to_torch_save(str(ckpt / "weights"), str(tmp_path / "w.pt"))
    weights = torch.load(tmp_path / "w.pt", weights_only=False)
    ours = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).state_dict()
    base = AutoModelForCausalLM.from_pretrained(str(toy["hf"]), dtype=torch.float32).state_dict()
    emb = ours["model.embed_tokens.weight"]
    assert torch.equal(emb, weights["embedding.word_embeddings.weight"][: emb.shape[0]])
    assert not torch.equal(emb, base["model.embed_tokens.weight"])  # trained, not pretrained

    from test_nemo_export import EXPORT_SCRIPT, nemo_python, run_nemo

    nemo_python()  # fails under CI when the NeMo environment is missing
    nemo_hf = tmp_path / "nemo_hf"
    run_nemo(str(EXPORT_SCRIPT), "--nemo", str(nemo), "--out", str(nemo_hf),
             "--report", str(tmp_path / "report.json"), cwd=tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(str(nemo_hf), dtype=torch.float32).state_dict()
    for name, t in ours.items():
        assert torch.equal(t, theirs[name]), name


def _start_mid_write(toy, run_dir: Path, log, marker: str) -> subprocess.Popen:
    """A DP2 async run whose write of checkpoint 20 is slowed; returns once iteration 21 has
    been logged while that write is still in flight (`latest` on iter_10). Meanwhile it checks
    that `latest` only ever names a committed folder."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEGATRON_CPT_TEST_MARKER": marker, **MID_WRITE}
    proc = subprocess.Popen(_cmd(2) + _args(toy, run_dir, ASYNC), env=env, cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    ck, metrics, deadline = run_dir / "checkpoints", run_dir / "metrics.jsonl", time.time() + 240
    while time.time() < deadline:
        _check_latest(ck)
        if metrics.exists() and sum('"train"' in x for x in metrics.read_text().splitlines()) >= 21:
            break
        time.sleep(0.1)
    assert (ck / "latest").read_text().strip() == "iter_0000010"
    assert (ck / ".iter_0000020.tmp").is_dir() and not (ck / "iter_0000020").exists()
    return proc


def _check_latest(ck: Path) -> None:
    pointer = ck / "latest"
    if pointer.exists():
        name = pointer.read_text().strip()
        assert (ck / name / "metadata.json").is_file(), f"latest names uncommitted {name}"


def test_async_save_sigterm_mid_write_commits_then_resumes_exactly(toy, dp2, tmp_path):
    import psutil

    run_dir = tmp_path / "run"
    with tempfile.TemporaryFile("w+") as log:
        proc = _start_mid_write(toy, run_dir, log, uuid.uuid4().hex)
        os.kill(psutil.Process(proc.pid).children()[-1].pid, signal.SIGTERM)  # one rank
        while proc.poll() is None:
            _check_latest(run_dir / "checkpoints")
            time.sleep(0.1)
        log.seek(0)
        out = log.read()
    status = exit_status(run_dir)
    assert status["code"] == 42 and "slow_save at iteration 20" in out, out[-3000:]
    stopped, ck = status["iteration"], run_dir / "checkpoints"
    assert 21 <= stopped < 30
    assert (ck / "latest").read_text().strip() == f"iter_{stopped:07d}"
    assert _meta(ck / "iter_0000020")["kind"] == "resume"  # the in-flight write was committed
    relaunch = launch(toy, 2, run_dir, ASYNC)
    _ok(relaunch)
    resumed = [r["iteration"] for r in records(run_dir, "event") if r["event"] == "resume"]
    assert resumed == [stopped]
    assert losses(run_dir) == losses(dp2)  # exact, every iteration
    assert sorted(i for _, i in sample_ids(run_dir)) == list(range(240))
    print(f"async: SIGTERM during the write of iteration 20, at iteration {stopped}; "
          "30/30 losses bit-identical after the relaunch")


def test_async_save_kill9_mid_write_keeps_previous_latest(toy, dp2, tmp_path):
    import psutil

    run_dir, marker = tmp_path / "run", uuid.uuid4().hex
    with tempfile.TemporaryFile("w+") as log:
        proc = _start_mid_write(toy, run_dir, log, marker)
        seen = _marked(marker)
        for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children()]:
            p.kill()  # the agent and both ranks; their background writers must die with them
        killed_at = time.time()
        proc.wait(timeout=30)
        while _marked(marker) and time.time() < killed_at + 20:
            time.sleep(0.2)
        survivors = [(p.pid, p.cmdline()[:3]) for p in _marked(marker)]
    assert not survivors and len(seen) >= 5, (survivors, len(seen))
    ck = run_dir / "checkpoints"
    assert (ck / "latest").read_text().strip() == "iter_0000010"
    assert not (ck / "iter_0000020").exists()
    relaunch = launch(toy, 2, run_dir, ASYNC)
    _ok(relaunch)
    assert not (ck / ".iter_0000020.tmp").exists()
    resumed = [r["details"] for r in records(run_dir, "event") if r["event"] == "resume"]
    assert resumed == ["iter_0000010"]
    assert losses(run_dir) == losses(dp2)
    print(f"async: kill -9 of {len(seen)} processes during the write of iteration 20; latest "
          "stayed on iter_0000010, 30/30 losses bit-identical after the relaunch")


def test_finished_run_drops_optimizer_state_and_a_relaunch_finds_it_complete(toy, tmp_path,
                                                                            single):
    """`checkpoint.keep_optimizer_at_end: false` (the study's setting): when the budget is spent
    the final checkpoint becomes weights-only and marked complete, the grid keeps weights only,
    the other resume checkpoints go; a relaunch trains nothing and exits 0; a longer budget is
    refused (exit 2) because the optimizer state is gone."""
    run_dir = tmp_path / "run"
    extra = ["checkpoint.keep_optimizer_at_end=false", "checkpoint.keep_last=3",
             "checkpoint.keep_every_tokens=10240"]  # grid: iteration 20; resume: 10, 20, 30
    _ok(launch(toy, 1, run_dir, extra))
    assert losses(run_dir) == losses(single)
    ck = run_dir / "checkpoints"
    assert sorted(p.name for p in ck.glob("iter_*")) == ["iter_0000020", "iter_0000030"]
    for it in (20, 30):
        ckpt = ck / f"iter_{it:07d}"
        assert _meta(ckpt)["kind"] == "evaluation"
        assert sorted(p.name for p in ckpt.iterdir()) == \
            ["metadata.json", "model.yaml", "tokenizer", "weights"]
    assert _meta(ck / "iter_0000030")["complete"] is True
    assert "complete" not in _meta(ck / "iter_0000020")
    assert (ck / "latest").read_text().strip() == "iter_0000030"
    trained = len(records(run_dir))

    again = launch(toy, 1, run_dir, extra)
    _ok(again)
    assert "run complete at iteration 30" in again.stdout + again.stderr
    assert exit_status(run_dir)["code"] == 0 and len(records(run_dir)) == trained

    longer = subprocess.run(_cmd(1) + ["--force"] + _args(toy, run_dir,
                                                         [*extra, "budget.iterations=40"]),
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert longer.returncode == 2, longer.stderr[-2000:]
    assert "its optimizer state was dropped" in longer.stderr
    assert "start a new run with model.pretrained=" in longer.stderr
