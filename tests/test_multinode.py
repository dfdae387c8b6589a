"""The study's launch paths across two real SLURM nodes (slurm/local/cluster.sh --nodes 2):
each node is its own network namespace with its own hostname and address (mcpt-n1 10.77.0.11,
mcpt-n2 10.77.0.12), so the rendezvous, MASTER_ADDR from SLURM_JOB_NODELIST and the gloo
connections between ranks really cross hosts. Run folders and data are on the one shared
filesystem, as on a cluster with a parallel filesystem.

When the cluster cannot start (no root, no network namespaces) these tests fail with the
reason; they are never skipped.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from megatron_cpt.launch.sbatch import render_all
from megatron_cpt.launch.study import StudyConfig

NODES = ("mcpt-n1", "mcpt-n2")
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
COLLECTIVE_TIMEOUT_MIN = 1.0
ITERATIONS = 20  # a checkpoint every 10


@pytest.fixture(scope="module", autouse=True)
def cluster2(slurm_cluster_2n):
    """This module's SLURM commands talk to the two-node cluster; the previous SLURM_CONF
    (the one-node cluster's, if another module set it) is put back afterwards."""
    before = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = slurm_cluster_2n
    yield slurm_cluster_2n
    if before is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = before


@pytest.fixture(scope="module")
def mn_study(tmp_path_factory, toy):
    """tiny-b at TP2 x DP2 on 2 nodes x 2 tasks (TP inside a node, DP across the nodes)."""
    from megatron_cpt.training.toy import make_toy

    root = tmp_path_factory.mktemp("multinode")
    toy_b = root / "toy-b"
    toy_b.mkdir()
    shutil.copytree(toy["tokenizer"], toy_b / "tokenizer")  # same tokenizer = same data
    b = make_toy(toy_b, model="tiny-b")
    ckpts = root / "ckpts"
    ckpts.mkdir()
    (ckpts / "tiny-b").symlink_to(b["pretrained"])
    study = {
        "name": "tiny-multinode", "train_config": str(REPO / "configs" / "train" / "tiny-cpu.yaml"),
        "study_dir": str(root / "study"), "data_root": str(Path(toy["prefixes"]["legal_train"]).parent),
        "checkpoint_root": str(ckpts), "domains": ["legal"], "general": False, "controls": [],
        "budget": {"iterations": ITERATIONS},
        "sizes": {"tiny-b": {"model": "tiny-b", "tp": 2, "pp": 1, "nodes": 2, "tasks_per_node": 2,
                             "time": "00:15:00", "signal_s": 30, "overrides": [
                                 "train.hang_timeout_min=0.5",
                                 f"train.collective_timeout_min={COLLECTIVE_TIMEOUT_MIN}"]}},
        "resources": {"gpus_per_node": 0, "tasks_per_node": 2, "cpus_per_task": 1, "mem": "1G",
                      "max_requeues": 5, "max_failures": 1},
        "eval": {"enabled": False, "exams": [], "num_fewshot": 0, "limit": 3, "batch_size": 8,
                 "valid_sequences": 4, "time": "00:15:00", "gpus": 0, "cpus": 1, "mem": "1G"},
    }
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    loaded = StudyConfig.load(path, use_env=False)
    script = next(p for p in render_all(loaded, root / "scripts") if p.name == "cpt_tiny-b_legal.sh")
    text = script.read_text()
    assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=2" in text
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1' in text
    cell = next(c for c in loaded.cells() if c.size.name == "tiny-b")
    return {"root": root, "script": script, "cell": cell, "path": path}


@pytest.fixture(scope="module")
def reference(mn_study) -> dict[int, float]:
    """The same cell as one 4-rank torchrun on this host (no SLURM): the losses to match."""
    run_dir = mn_study["root"] / "reference"
    args = ["--config", str(REPO / "configs" / "train" / "tiny-cpu.yaml"),
            *mn_study["cell"].trainer_overrides(run_dir=str(run_dir))]
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=4",
           "-m", "megatron_cpt", "train", *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryFile("w+") as out:
        rc = subprocess.run(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                            timeout=900).returncode
        out.seek(0)
        assert rc == 0, out.read()[-3000:]
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, ITERATIONS + 1))
    return losses


# ---------------------------------------------------------------- helpers
def _job(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                         text=True).stdout
    return dict(t.split("=", 1) for t in out.split() if "=" in t)


def _ns_pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _job_processes(ns: str) -> list[int]:
    """Processes of jobs in a node's namespace: everything there but its slurmd."""
    return [p for p in _ns_pids(ns) if not _cmdline(p).startswith("slurmd ")]


def _wait(job_id: str, timeout: float = 900) -> dict:
    """Wait for a job to end. A requeued job waits out SLURM's requeue delay (BeginTime);
    release it once nothing of its previous instance runs on either node plus 3 s (slurmd
    refuses a launch whose credential is not newer, in whole seconds, than the last revocation)."""
    deadline, ended = time.time() + timeout, None
    while time.time() < deadline:
        job = _job(job_id)
        state = job.get("JobState", "")
        if state in FINAL_STATES:
            return job
        if state == "PENDING" and job.get("Reason") == "BeginTime":
            if any(_job_processes(ns) for ns in NODES):
                ended = None
            elif ended is None:
                ended = time.time()
            elif time.time() - ended >= 3:
                subprocess.run(["scontrol", "update", f"jobid={job_id}", "starttime=now"],
                               check=False)
        else:
            ended = None
        time.sleep(0.5)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"job {job_id} did not finish in {timeout} s: {_job(job_id)}")


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in _records(run_dir) if r["kind"] == "train"}


def _history(run_dir: Path) -> list[dict]:
    path = run_dir / "launches.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _sbatch(script: Path, study_dir: Path) -> str:
    study_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MCPT_PYTHON": sys.executable, "MCPT_REPO": str(REPO),
           "MCPT_STUDY_DIR": str(study_dir)}
    out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True,
                         env=env, cwd=study_dir, check=True).stdout
    return out.strip().split(";")[0]


def _log(study_dir: Path, job_id: str) -> str:
    path = study_dir / f"slurm-cpt_tiny-b_legal-{job_id}.out"
    return path.read_text()[-3000:] if path.is_file() else "(no job output)"


# ---------------------------------------------------------------- the tests
def test_cluster_has_two_hosts():
    """Two nodes, each answering with its own hostname and address; a task on one node
    reaches the other by name (the route torch.distributed takes)."""
    out = subprocess.run(["srun", "--nodes=2", "--ntasks-per-node=1", "-l", "sh", "-c",
                          'echo "$(hostname) $SLURM_NODEID $(getent hosts mcpt-n1 | cut -d" " -f1)"'],
                         capture_output=True, text=True, timeout=120, cwd="/tmp")
    assert out.returncode == 0, out.stderr
    rows = sorted(line.split(": ", 1)[1] for line in out.stdout.splitlines())
    assert rows == ["mcpt-n1 0 10.77.0.11", "mcpt-n2 1 10.77.0.11"], out.stdout


def test_sbatch_tp2_dp2_across_two_nodes(mn_study, reference):
    """The rendered cell script with --nodes=2 --ntasks-per-node=2: MASTER_ADDR is the first
    host of the job's node list, ranks 0-1 (one TP group) run on mcpt-n1 and ranks 2-3 on
    mcpt-n2, and the losses equal the one-host 4-rank run's exactly."""
    study_dir = mn_study["root"] / "sbatch"
    t0 = time.time()
    job_id = _sbatch(mn_study["script"], study_dir)
    job = _wait(job_id)
    print(f"two-node TP2 x DP2 sbatch run: {time.time() - t0:.1f} s")
    run = study_dir / "runs" / "tiny-b" / "legal"
    assert job["JobState"] == "COMPLETED", (job, _log(study_dir, job_id))
    assert job["NodeList"] == "mcpt-n[1-2]", job
    info = json.loads((run / "run.json").read_text())
    where = info["placement"]
    assert where["hosts"] == list(NODES), where
    assert [(r["rank"], r["host"], r["node_id"], r["local_rank"]) for r in where["ranks"]] == [
        (0, "mcpt-n1", 0, 0), (1, "mcpt-n1", 0, 1), (2, "mcpt-n2", 1, 0), (3, "mcpt-n2", 1, 1)]
    assert info["world_size"] == 4 and info["dp"] == 2
    assert _losses(run) == reference, "two-node losses differ from the one-host 4-rank run"


def test_node_lost_mid_run(mn_study, reference):
    """After the first checkpoint (iteration 10) every process of the run on mcpt-n2 is
    killed (kill -9, as a node that dies): the ranks on mcpt-n1 fail their next collective
    (or srun's --kill-on-bad-exit stops them) well within train.collective_timeout_min, the
    script retries the job (max_failures 1), it resumes from iteration 10 on the nodes SLURM
    gives it and ends with the uninterrupted losses."""
    study_dir = mn_study["root"] / "nodeloss"
    run = study_dir / "runs" / "tiny-b" / "legal"
    job_id = _sbatch(mn_study["script"], study_dir)
    deadline, killed_at, victims = time.time() + 600, None, []
    while time.time() < deadline:
        done = [r["iteration"] for r in _records(run) if r["kind"] == "train"]
        if (run / "checkpoints" / "latest").is_file() and done and max(done) >= 11:
            victims = [p for p in _job_processes("mcpt-n2") if "megatron_cpt" in _cmdline(p)]
            assert victims, "no rank of the run on mcpt-n2"
            killed_at = time.time()
            for pid in victims:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            break
        assert _job(job_id).get("JobState") not in FINAL_STATES, _log(study_dir, job_id)
        time.sleep(0.2)
    assert killed_at, f"job {job_id} never passed its first checkpoint"
    while not _history(run) and time.time() < killed_at + 300:
        time.sleep(0.2)
    first_end = time.time()
    job = _wait(job_id)
    assert job["JobState"] == "COMPLETED", (job, _log(study_dir, job_id))
    history = _history(run)
    assert [(h["reason"], h["decision"]) for h in history] == [("crash", "retry"),
                                                               ("done", "finished")], history
    assert int(job["Restarts"]) == 1, job
    resume = next(r for r in _records(run) if r["kind"] == "event" and r["event"] == "resume")
    assert resume["iteration"] == 10, resume
    to_end, to_resume = first_end - killed_at, resume["time"] - killed_at
    assert to_end < COLLECTIVE_TIMEOUT_MIN * 60, f"the job took {to_end:.1f} s to end after the kill"
    assert _losses(run) == reference, "losses after the node loss differ from the uninterrupted run"
    print(f"node lost (kill -9 of {len(victims)} processes on mcpt-n2): job instance ended "
          f"{to_end:.1f} s later, resumed at iteration 10 {to_resume:.1f} s after the kill")


def _jobs_after(first_id: int) -> list[dict]:
    out = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True).stdout
    jobs = [dict(t.split("=", 1) for t in line.split() if "=" in t) for line in out.splitlines()]
    return [j for j in jobs if j.get("JobId", "").isdigit() and int(j["JobId"]) > first_id]


def test_tokenize_on_slurm_arrays_across_both_nodes_equals_local(tmp_path, toy):
    """`prep tokenize --executor slurm`: the array's units run on both nodes (data and output
    on the shared filesystem) and the merged .bin/.idx are byte-identical to a local run."""
    import hashlib
    import random

    from megatron_cpt.cli import main

    rng = random.Random(3)
    words = ["contract", "court", "patient", "ledger", "audit", "the", "of", "clause", "dose"]
    docs = tmp_path / "docs.jsonl"
    with docs.open("w") as fh:
        for i in range(600):
            fh.write(json.dumps({"id": str(i), "text": " ".join(rng.choice(words)
                                                                for _ in range(rng.randint(20, 60)))}) + "\n")
    common = ["prep", "tokenize", "--input", str(docs), "--tokenizer", str(toy["tokenizer"]),
              "--unit-mb", "0.02"]
    assert main([*common, "--output-prefix", str(tmp_path / "local")]) == 0
    last = max([int(j["JobId"]) for j in _jobs_after(0)] or [0])
    assert main([*common, "--output-prefix", str(tmp_path / "slurm"), "--executor", "slurm",
                 "--slurm-partition", "debug", "--slurm-cpus", "1", "--slurm-time", "00:10:00"]) == 0
    deadline = time.time() + 600
    while not (tmp_path / "slurm.manifest.json").exists():
        assert time.time() < deadline, subprocess.run(["squeue"], capture_output=True, text=True).stdout
        time.sleep(1)
    for ext in (".bin", ".idx"):
        a, b = (hashlib.sha256((tmp_path / (n + ext)).read_bytes()).hexdigest() for n in ("local", "slurm"))
        assert a == b, ext
    hosts = {j.get("BatchHost") for j in _jobs_after(last)}
    assert set(NODES) <= hosts, hosts


def test_submitit_grid_cell_on_two_nodes(mn_study, reference, monkeypatch):
    """`launch grid` (submitit) of the two-node cell: its ranks rendezvous at the first host
    submitit names, run on both nodes and reproduce the one-host losses."""
    from megatron_cpt.cli import main

    study_dir = mn_study["root"] / "grid"
    monkeypatch.setenv("MCPT_STUDY_DIR", str(study_dir))
    assert main(["launch", "grid", "--study", str(mn_study["path"]), "--domains", "legal",
                 "--no-eval"]) == 0
    entry = json.loads((study_dir / "launches.json").read_text())["tiny-b/legal"]
    job = _wait(entry["train_job"])
    run = study_dir / "runs" / "tiny-b" / "legal"
    assert job["JobState"] == "COMPLETED", (job, _records(run)[-3:])
    where = json.loads((run / "run.json").read_text())["placement"]
    assert where["hosts"] == list(NODES), where
    assert [r["host"] for r in where["ranks"]] == ["mcpt-n1", "mcpt-n1", "mcpt-n2", "mcpt-n2"]
    assert _losses(run) == reference, "grid losses on two nodes differ from the one-host run"


@pytest.fixture(scope="module")
def one_node_script(mn_study) -> Path:
    """The same cell on one node (TP2, 2 tasks), so a job can be pinned to either node."""
    doc = yaml.safe_load(mn_study["path"].read_text())
    doc["sizes"]["tiny-b"].update(nodes=1, tasks_per_node=2)
    path = mn_study["root"] / "study-1node.yaml"
    path.write_text(yaml.safe_dump(doc))
    scripts = render_all(StudyConfig.load(path, use_env=False), mn_study["root"] / "scripts-1node")
    script = next(p for p in scripts if p.name == "cpt_tiny-b_legal.sh")
    assert "#SBATCH --nodes=1" in script.read_text()
    return script


def _submit_on(script: Path, study_dir: Path, node: str, env: dict) -> str:
    study_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MCPT_PYTHON": sys.executable, "MCPT_REPO": str(REPO),
           "MCPT_STUDY_DIR": str(study_dir), **env}
    out = subprocess.run(["sbatch", "--parsable", f"--nodelist={node}", str(script)],
                         capture_output=True, text=True, env=env, cwd=study_dir, check=True).stdout
    return out.strip().split(";")[0]


def _train_after(records: list[dict], event: str) -> list[int]:
    """Train iterations logged after the first ``event`` record."""
    at = next(i for i, r in enumerate(records) if r["kind"] == "event" and r["event"] == event)
    return [r["iteration"] for r in records[at:] if r["kind"] == "train"]


def test_a_frozen_node_that_returns_gets_no_second_copy(one_node_script, mn_study):
    """A run on mcpt-n2 is frozen (SIGSTOP of its processes, as a node that stops answering)
    after its first checkpoint. A relaunch on mcpt-n1 is refused while the lease's heartbeat is
    fresh (the pid cannot be checked from another host); once it is older than
    MCPT_LEASE_STALE_S the relaunch takes the run over and resumes. Then the frozen node comes
    back (SIGCONT): its launch stops with exit 5 (superseded, not retried) without writing a
    record or committing a checkpoint, and the run ends with each iteration logged once after
    the takeover and every later checkpoint written by the new job."""
    import signal

    study_dir = mn_study["root"] / "frozen"
    run = study_dir / "runs" / "tiny-b" / "legal"
    first = _submit_on(one_node_script, study_dir, "mcpt-n2",
                       {"MEGATRON_CPT_TEST_FAULT": "slow_steps@11"})
    deadline, frozen = time.time() + 600, []
    while time.time() < deadline and not frozen:
        done = [r["iteration"] for r in _records(run) if r["kind"] == "train"]
        if (run / "checkpoints" / "latest").is_file() and done and max(done) >= 11:
            frozen = [p for p in _job_processes("mcpt-n2")
                      if "megatron_cpt" in _cmdline(p) and str(study_dir) in _cmdline(p)]
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
            break
        assert _job(first).get("JobState") not in FINAL_STATES, _log(study_dir, first)
        time.sleep(0.2)
    assert frozen, f"job {first} never passed its first checkpoint"
    frozen_at, logged_before = time.time(), len(_records(run))
    try:
        refused = _submit_on(one_node_script, study_dir, "mcpt-n1", {})
        job = _wait(refused, timeout=300)
        assert job["ExitCode"].startswith("2:"), (job, _log(study_dir, refused))
        assert "is in use by host mcpt-n2" in _log(study_dir, refused)
        assert len(_records(run)) == logged_before, "a refused launch wrote to the run folder"
        stale_s = 10
        while time.time() < frozen_at + stale_s:
            time.sleep(0.5)
        second = _submit_on(one_node_script, study_dir, "mcpt-n1",
                            {"MCPT_LEASE_STALE_S": str(stale_s),
                             "MEGATRON_CPT_TEST_FAULT": "slow_steps@1"})
        while time.time() < deadline:
            records = _records(run)
            if any(r["kind"] == "event" and r["event"] == "lease" for r in records) \
                    and len(_train_after(records, "lease")) >= 2:
                break
            assert _job(second).get("JobState") not in FINAL_STATES, _log(study_dir, second)
            time.sleep(0.2)
    finally:
        thawed_at = time.time()
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    job_a = _wait(first, timeout=300)
    ended_after = time.time() - thawed_at
    job_b = _wait(second)
    assert job_b["JobState"] == "COMPLETED", (job_b, _log(study_dir, second))
    assert job_a["ExitCode"].startswith("5:") and int(job_a["Restarts"]) == 0, \
        (job_a, _log(study_dir, first))
    assert "[run lease] another launch took the lease" in _log(study_dir, first)
    records = _records(run)
    takeover = next(r for r in records if r["kind"] == "event" and r["event"] == "lease")
    assert "took over the lease of host mcpt-n2" in takeover["details"], takeover
    assert "heartbeat" in takeover["details"], takeover
    # the relaunch's resume record comes just before its lease record (both before its steps)
    resume = next(r for r in records if r["kind"] == "event" and r["event"] == "resume")
    after = _train_after(records, "lease")
    assert after == list(range(resume["iteration"] + 1, ITERATIONS + 1)), \
        f"iterations logged after the takeover: {after} (a second writer?)"
    for ckpt in sorted((run / "checkpoints").glob("iter_*")):
        meta = json.loads((ckpt / "metadata.json").read_text())
        if meta["iteration"] > resume["iteration"]:
            assert meta["written_by"]["job"] == second and meta["written_by"]["host"] == "mcpt-n1", meta
    history = [(h["job"], h["reason"], h["decision"]) for h in _history(run)]
    assert (first, "lease_lost", "failed") in history and (second, "done", "finished") in history, history
    print(f"frozen node: relaunch refused while the lease was fresh; taken over "
          f"{takeover['time'] - frozen_at:.1f} s after the freeze (staleness {stale_s} s), resumed "
          f"at iteration {resume['iteration']}; the returning launch ended {ended_after:.1f} s "
          f"after SIGCONT with exit 5 and wrote nothing")
