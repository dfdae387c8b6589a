"""Trainer end to end on CPU: real `torchrun` processes (gloo) on the tiny model.

Launches (each one process group): 1 process x 30 steps; TP2, PP2, TP2xPP2 x 4 steps;
DP2 x 30 steps (the reference of the preemption test); DP2 stopped by SIGTERM + relaunch;
1 process crashed inside a checkpoint save + relaunch; run integrity (issue 13): a NaN in a
weight (stop) and in a gradient (skip); broken checkpoints refused, then --resume-from.
"""
from __future__ import annotations

import json
import math
import os
import shutil
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
                "tokens_per_s", "tflops_per_gpu", "mfu", "rank_time_max_s", "slowest_rank",
                "rank_time_min_s", "fastest_rank", "peak_mem_gb", "peak_mem_rank"):
        assert key in rec
    assert rec["slowest_rank"] == rec["fastest_rank"] == 0 and rec["peak_mem_gb"] > 0.05
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
        # a NaN in each TP rank's gradient shard: the grad norm (reduced over TP) is NaN on
        # both ranks, the update is never applied, so the weights of step 4 are saved
        proc = launch(toy, nproc, run_dir, [*par, "logging.tensorboard=true"],
                      env={"MEGATRON_CPT_TEST_FAULT": f"nan_grad@{steps + 1}"})
        assert exit_status(run_dir) == {"code": 3, "iteration": steps, "iterations": 30,
                                        "reason": "nonfinite"}, proc.stderr[-4000:]
        assert f"non-finite grad norm nan at iteration {steps + 1}" in proc.stderr
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
    assert exit_status(run_dir)["reason"] == "running"  # never the previous launch's verdict
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



def _marked(marker: str) -> list:
    """Every live process whose environment carries ``marker`` (a launch and all it started)."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("MEGATRON_CPT_TEST_MARKER") == marker and p.status() != "zombie":
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_one_writer_kill9_agent_orphans_stop_and_relaunch_takes_over(toy, dp2, tmp_path):
    """A second launch on a live run folder is refused; `kill -9` of torchrun's agent: its
    workers and their checkpoint-writer helpers end by themselves; the relaunch takes the
    lease over and reproduces the uninterrupted losses."""
    import uuid

    run_dir, marker = tmp_path / "run", uuid.uuid4().hex
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEGATRON_CPT_TEST_MARKER": marker,
           "MEGATRON_CPT_TEST_FAULT": "slow_steps@11"}  # still running when we act
    with tempfile.TemporaryFile("w+") as log:
        first = subprocess.Popen(_cmd(2) + _args(toy, run_dir, []), env=env, cwd=ROOT,
                                 stdout=log, stderr=subprocess.STDOUT)
        deadline, metrics = time.time() + 240, run_dir / "metrics.jsonl"
        while time.time() < deadline and not (metrics.exists() and sum(
                '"train"' in x for x in metrics.read_text().splitlines()) >= 11):
            time.sleep(0.2)
        second = launch(toy, 1, run_dir)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"run folder {run_dir} is in use by host" in second.stderr, second.stderr[-2000:]
        helpers = len(_marked(marker))
        os.kill(first.pid, signal.SIGKILL)  # the agent only: its workers are in other sessions
        killed_at = time.time()
        while _marked(marker) and time.time() < killed_at + 20:
            time.sleep(0.2)
        survivors = [(p.pid, p.cmdline()[:3]) for p in _marked(marker)]
        gone_after = time.time() - killed_at
        first.wait(timeout=10)
    assert not survivors, f"still alive {gone_after:.1f} s after kill -9 of the agent: {survivors}"
    assert helpers >= 5, helpers  # agent, 2 workers and their writer helpers were seen
    relaunch = launch(toy, 2, run_dir)
    _ok(relaunch)
    lease = [r for r in records(run_dir, "event") if r["event"] == "lease"]
    assert len(lease) == 1 and "is gone" in lease[0]["details"], lease
    resumed = [r["iteration"] for r in records(run_dir, "event") if r["event"] == "resume"]
    assert resumed and resumed[0] >= 10, resumed
    assert losses(run_dir) == losses(dp2)
    assert not (run_dir / "lease.json").exists()
    print(f"kill -9 agent: {helpers} processes, all gone {gone_after:.1f} s later; relaunch took "
          f"the lease over, resumed at {resumed[0]}, 30/30 losses equal")


def test_sigkill_of_a_rank_leaves_no_process_of_the_run(toy, tmp_path):
    """`kill -9` of one rank after the first checkpoint (its writer helpers exist): torchrun
    ends the other rank, and no process of the run (writer helpers included) survives."""
    import uuid

    import psutil

    run_dir, marker = tmp_path / "run", uuid.uuid4().hex
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEGATRON_CPT_TEST_MARKER": marker,
           "MEGATRON_CPT_TEST_FAULT": "slow_steps@11"}
    with tempfile.TemporaryFile("w+") as log:
        agent = subprocess.Popen(_cmd(2) + _args(toy, run_dir, []), env=env, cwd=ROOT,
                                 stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while time.time() < deadline and not (run_dir / "checkpoints" / "iter_0000010").is_dir():
            time.sleep(0.2)
        time.sleep(1.0)
        seen = _marked(marker)
        rank1 = [p for p in psutil.Process(agent.pid).children()][-1]
        rank1.kill()
        code = agent.wait(timeout=120)
        killed_at = time.time()
        while _marked(marker) and time.time() < killed_at + 20:
            time.sleep(0.2)
        survivors = [(p.pid, p.cmdline()[:3]) for p in _marked(marker)]
    assert code != 0 and len(seen) >= 5, (code, [p.pid for p in seen])
    assert not survivors, f"alive after the agent ended: {survivors}"
    print(f"kill -9 of rank 1: {len(seen)} processes of the run, none left "
          f"{time.time() - killed_at:.1f} s after the agent exited {code}")


# -- run integrity (issue 13): non-finite steps, explicit resume ----------------------------
def _finite_checkpoint(ckpt: Path, tmp: Path) -> bool:
    """Every tensor of a committed checkpoint (model and optimizer state) is finite."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{ckpt.name}.pt"
    dcp_to_torch_save(str(ckpt / "weights"), str(out))
    state = torch.load(out, weights_only=False)
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    assert tensors, f"no tensors in {ckpt}"
    return all(bool(torch.isfinite(t.float()).all()) for t in tensors)


def _committed(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*"))


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nan_in_a_weight_never_reaches_a_checkpoint(toy, single, tmp_path, policy):
    """stop (default), NaN at a random iteration: exit 3 at once. skip (max_skipped_steps=1),
    NaN before iteration 20: step 20 is skipped, its checkpoint is not written (the weights are
    NaN), step 21 exceeds the skips: exit 3. Both: latest stays on the last committed checkpoint
    (iteration 10) and every committed checkpoint is finite."""
    import random

    at = random.randint(12, 19) if policy == "stop" else 20
    print(f"on_nonfinite={policy}: NaN written into a weight before iteration {at}")
    run_dir = tmp_path / "run"
    extra = [] if policy == "stop" else ["train.on_nonfinite=skip", "train.max_skipped_steps=1"]
    proc = launch(toy, 1, run_dir, extra, env={"MEGATRON_CPT_TEST_FAULT": f"nan_weight@{at}"})
    _ok(proc, 3)
    last = at - 1 if policy == "stop" else at
    assert exit_status(run_dir) == {"code": 3, "iteration": last, "iterations": 30,
                                    "reason": "nonfinite"}
    assert f"non-finite loss nan at iteration {last + 1}; the weights are non-finite, nothing " \
           "saved; checkpoints/latest stays on iter_0000010" in proc.stderr, proc.stderr[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000010"
    assert _committed(run_dir) == ["iter_0000010"]
    assert _finite_checkpoint(run_dir / "checkpoints" / "iter_0000010", tmp_path)
    got, ref = losses(run_dir), losses(single)
    assert got == {i: ref[i] for i in range(1, at)}  # iteration `at` never logged a loss
    events = [(r["event"], r["iteration"]) for r in records(run_dir, "event")
              if r["event"] in ("skipped", "nonfinite")]
    assert events == ([("nonfinite", at - 1)] * 2 if policy == "stop" else
                      [("skipped", 20), ("nonfinite", 20), ("nonfinite", 20), ("nonfinite", 20)])


def test_nan_in_a_gradient_is_skipped_and_logged(toy, single, tmp_path):
    """skip: the update of the bad step is dropped, the run goes on to the end with finite
    checkpoints; the skip is an event and counts against train.max_skipped_steps."""
    import random

    at = random.randint(12, 19)
    print(f"NaN written into a gradient at iteration {at}")
    run_dir = tmp_path / "run"
    proc = launch(toy, 1, run_dir, ["train.on_nonfinite=skip", "train.max_skipped_steps=1"],
                  env={"MEGATRON_CPT_TEST_FAULT": f"nan_grad@{at}"})
    _ok(proc)
    skipped = [r for r in records(run_dir, "event") if r["event"] == "skipped"]
    assert [r["iteration"] for r in skipped] == [at], skipped
    assert "non-finite grad norm nan" in skipped[0]["details"]
    got, ref = losses(run_dir), losses(single)
    assert sorted(got) == [i for i in range(1, 31) if i != at]
    assert {i: got[i] for i in range(1, at)} == {i: ref[i] for i in range(1, at)}
    assert all(math.isfinite(v) for v in got.values())
    ck = run_dir / "checkpoints"
    assert _committed(run_dir) == ["iter_0000020", "iter_0000030"]
    assert all(_finite_checkpoint(ck / n, tmp_path) for n in _committed(run_dir))
    meta = json.loads((ck / "iter_0000030" / "metadata.json").read_text())
    assert meta["skipped_steps"] == 1


def _snapshot(run_dir: Path) -> dict[str, tuple[int, float]]:
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in run_dir.rglob("*") if p.is_file() and p.name != "exit_status.json"}


def _break(run_dir: Path, fault: str) -> None:
    ck = run_dir / "checkpoints"
    if fault == "dangling_latest":
        (ck / "latest").write_text("iter_0000040\n")
    elif fault == "deleted_weights":
        shutil.rmtree(ck / "iter_0000030" / "weights")
    else:
        next((ck / "iter_0000030" / "weights").glob("*.distcp")).unlink()


WHY = {"dangling_latest": "checkpoints/latest names iter_0000040, which does not exist",
       "deleted_weights": "checkpoints/latest names iter_0000030, which has no weights/",
       "deleted_distcp": "checkpoints/latest names iter_0000030, which lacks weights/__"}


@pytest.mark.parametrize("fault", list(WHY))
def test_broken_latest_checkpoint_is_refused_then_resume_from(toy, single, tmp_path, fault):
    """A run folder whose latest checkpoint is gone or incomplete: exit 2 with one line naming
    the newest complete checkpoint, nothing in the run folder touched but the verdict. For a
    deleted .distcp: --resume-from iter_0000020 then reproduces the uninterrupted losses."""
    from megatron_cpt.training import checkpointing
    from megatron_cpt.training.config import TrainConfig

    run_dir = tmp_path / "run"
    shutil.copytree(single, run_dir)
    plan_of = lambda **kw: checkpointing.plan_resume(run_dir, 1, **kw)  # noqa: E731
    assert plan_of().describe() == "resume at iteration 30 from iter_0000030 (checkpoints/latest)"
    _break(run_dir, fault)
    before = _snapshot(run_dir)
    proc = launch(toy, 1, run_dir)
    _ok(proc, 2)
    err = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(err) == 1 and WHY[fault] in err[0], proc.stderr[-3000:]
    good = "iter_0000030" if fault == "dangling_latest" else "iter_0000020"
    assert f"the newest complete checkpoint is {good}: relaunch with --resume-from {good}" in err[0]
    assert _snapshot(run_dir) == before
    assert exit_status(run_dir)["code"] == 2 and exit_status(run_dir)["reason"] == "usage"
    if fault != "deleted_distcp":
        return
    # --check says what a launch would do (same decision as the launch)
    cfg = TrainConfig.load(CONFIG, _args(toy, run_dir, [])[2:])
    from megatron_cpt.training.preflight import prepare

    assert prepare(cfg, resume_from="iter_0000020").resume.describe() == \
        "resume at iteration 20 from iter_0000020 (--resume-from)"
    # a resume that runs other code is noted
    info = json.loads((run_dir / "run.json").read_text())
    info["provenance"]["git_commit"] = "0" * 40
    (run_dir / "run.json").write_text(json.dumps(info))
    resumed = launch(toy, 1, run_dir, ["--resume-from", "iter_0000020"])
    _ok(resumed)
    assert losses(run_dir) == losses(single)  # iterations 21..30 redone, exactly
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000030"
    assert checkpointing.checkpoint_problem(run_dir / "checkpoints" / "iter_0000030", 1) is None
    events = [r["event"] for r in records(run_dir, "event")
              if r["event"] in ("resume", "code_changed")]
    assert events == ["resume", "code_changed"], events
    prov = json.loads((run_dir / "run.json").read_text())["provenance"]
    assert prov["git_commit"] != "0" * 40 and prov["version"]
    assert exit_status(run_dir)["code"] == 0


def test_fresh_folder_check_says_fresh_start(tmp_path):
    from megatron_cpt.training import checkpointing

    assert checkpointing.plan_resume(tmp_path / "new", 1).describe().startswith("fresh start")
    (tmp_path / "run" / "checkpoints" / "iter_0000010").mkdir(parents=True)
    with pytest.raises(Exception, match="checkpoints/latest is missing or empty; no complete "
                                        "checkpoint remains"):
        checkpointing.plan_resume(tmp_path / "run", 1)


def test_resume_at_another_dp_is_planned_and_another_tp_refused(single, tmp_path):
    """``single`` is a real TP1 ``dp_reshardable`` checkpoint: DP may change, TP may not; a
    checkpoint without a layout record (older code) needs its own world size."""
    from megatron_cpt.errors import UsageError
    from megatron_cpt.training import checkpointing
    from megatron_cpt.training.checkpointing import Layout

    assert checkpointing.plan_resume(single, 2).describe() == (
        "resume at iteration 30 from iter_0000030 (checkpoints/latest); "
        "layout TP1 PP1 DP1 -> TP1 PP1 DP2")
    with pytest.raises(UsageError, match="iter_0000030 was saved at TP1 PP1 DP1 with "
                                         "checkpoint.optimizer_format=dp_reshardable, which resumes "
                                         "only at TP1 PP1 \\(any DP\\), not at TP2 PP1 DP1"):
        checkpointing.plan_resume(single, 2, layout=Layout.of(2, 1, 1))
    old = tmp_path / "run"
    shutil.copytree(single / "checkpoints", old / "checkpoints")
    meta_path = old / "checkpoints" / "iter_0000030" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    del meta["layout"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UsageError, match="was written by 1 ranks before layouts were recorded, "
                                         "this launch has 2"):
        checkpointing.plan_resume(old, 2)


def test_a_launch_that_raises_records_its_verdict(toy, single, tmp_path):
    """A launch ended by an exception (here: its checkpoint's bytes corrupted on disk, caught by
    torch's loader while resuming) leaves exit_status.json with its code (2: a damaged checkpoint
    is refused as one line, issue 25) and the one line, never "running" (issue 24, item 5)."""
    run_dir = tmp_path / "run"
    shutil.copytree(single, run_dir)
    shard = sorted((run_dir / "checkpoints" / "iter_0000030" / "weights").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[1000:1200] = bytes(200)  # same size: only reading it finds the damage
    shard.write_bytes(bytes(data))
    proc = launch(toy, 1, run_dir)
    status = exit_status(run_dir)
    # exit 2: torch's CheckpointException is a BaseException, refused as one line all the same
    assert status["code"] == 2 == proc.returncode, (status, proc.returncode, proc.stderr[-2000:])
    assert status["reason"] != "running" and status["message"].strip(), status
    assert "\n" not in status["message"]
    assert "iter_0000030/weights/" in status["message"] and "Traceback" not in proc.stderr
