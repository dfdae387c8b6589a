"""SLURM launch: committed sbatch scripts, pre-submission errors, and runs against a real
one-node SLURM cluster (slurm/local/cluster.sh: munged + slurmctld + slurmd on this machine).

When the cluster cannot start, the SLURM tests fail with the reason; they are never skipped.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from megatron_cpt.cli import main
from megatron_cpt.launch.sbatch import render_all
from megatron_cpt.launch.study import StudyConfig
from megatron_cpt.training.fault_hooks import SLOW_S

FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


# ---------------------------------------------------------------- committed scripts, errors
def test_committed_scripts_match_their_rendering(tmp_path):
    study = StudyConfig.load(REPO / "configs" / "study.yaml", use_env=False)
    rendered = {p.name: p.read_text() for p in render_all(study, tmp_path)}
    committed = {p.name: p.read_text() for p in (REPO / "slurm").glob("cpt_*.sh")}
    assert len(rendered) == 4 * 7 + 2 * 2  # 4 sizes x (general + 3 domains + 3 controls)
    assert "cpt_7b_legal_replay25.sh" in rendered  # + legal at 5% and 25% replay, 3b and 7b
    assert sorted(committed) == sorted(rendered), "re-run `megatron-cpt launch render-sbatch`"
    stale = [name for name in rendered if committed[name] != rendered[name]]
    assert not stale, f"committed scripts differ from their rendering: {stale}; re-render them"
    s14 = committed["cpt_14b_medical.sh"]
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --requeue",
                 "#SBATCH --signal=USR1@600", '"parallel.tp=4"', "scontrol requeue",
                 "$DATA_ROOT/medical_train", "MCPT_CONTAINER_IMAGE", "SBATCH_PARTITION"):
        assert line in s14, line
    assert subprocess.run(["bash", "-n", str(REPO / "slurm" / "cpt_14b_medical.sh")]).returncode == 0


def _study_yaml(path: Path, **changes) -> Path:
    raw = yaml.safe_load((REPO / "configs" / "study.yaml").read_text())
    raw["train_config"] = str(REPO / "configs" / "train" / "study-base.yaml")
    raw["eval"]["exams"] = []
    for key, value in changes.items():
        raw[key] = value
    path.write_text(yaml.safe_dump(raw))
    return path


def _error(capsys, *argv) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_errors_before_submission(tmp_path, capsys, toy, monkeypatch):
    for var in ("MCPT_STUDY_DIR", "MCPT_DATA_ROOT", "MCPT_CKPT_ROOT"):
        monkeypatch.delenv(var, raising=False)
    study = _study_yaml(tmp_path / "study.yaml", study_dir=str(tmp_path / "runs"),
                        data_root=str(tmp_path / "data"), checkpoint_root=str(tmp_path / "ckpts"))
    s = str(study)
    assert "unknown size '2b'" in _error(capsys, "launch", "grid", "--study", s, "--sizes", "2b")
    assert "unknown domain 'finance'" in _error(capsys, "launch", "grid", "--study", s,
                                                "--domains", "finance")
    err = _error(capsys, "launch", "grid", "--study", s, "--sizes", "7b")
    assert "pretrained checkpoint" in err and "qwen2.5-7b" in err
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts" / "qwen2.5-7b").symlink_to(toy["pretrained"])  # any valid checkpoint
    err = _error(capsys, "launch", "grid", "--study", s, "--sizes", "7b")
    assert "data prefix" in err and "general_train" in err
    assert not (tmp_path / "runs" / "launches.json").exists()  # nothing was submitted

    # resource requests that cannot hold the size's TP x PP
    bad = {"14b": {"model": "qwen2.5-14b", "tp": 8, "pp": 1, "nodes": 1}}
    s2 = str(_study_yaml(tmp_path / "s2.yaml", sizes=bad,
                         resources={"gpus_per_node": 4, "tasks_per_node": 4}))
    assert "spans more than one 4-GPU node" in _error(capsys, "launch", "grid", "--study", s2,
                                                      "--dry-run")
    bad = {"7b": {"model": "qwen2.5-7b", "tp": 2, "pp": 1, "nodes": 1, "tasks_per_node": 3}}
    s3 = str(_study_yaml(tmp_path / "s3.yaml", sizes=bad,
                         resources={"gpus_per_node": 0, "tasks_per_node": 3}))
    assert "not a multiple of TP x PP = 2" in _error(capsys, "launch", "render-sbatch",
                                                     "--study", s3, "--out", str(tmp_path / "o"))
    bad = {"7b": {"model": "qwen2.5-7b", "tp": 3, "pp": 1, "nodes": 1}}
    s4 = str(_study_yaml(tmp_path / "s4.yaml", sizes=bad))
    assert "TP=3" in _error(capsys, "launch", "grid", "--study", s4, "--dry-run")
    s5 = str(_study_yaml(tmp_path / "s5.yaml", controls=["finance"]))
    assert "controls" in _error(capsys, "launch", "grid", "--study", s5, "--dry-run")


def test_dry_run_prints_the_plan(capsys):
    assert main(["launch", "grid", "--study", str(REPO / "configs" / "study.yaml"), "--dry-run",
                 "--sizes", "14b", "--domains", "medical", "control_medical"]) == 0
    out = capsys.readouterr().out
    assert "14b/medical" in out and "14b/control_medical" in out and "nothing submitted" in out
    row = next(line for line in out.splitlines() if line.startswith("14b/medical"))
    assert "4x1" in row and "2.000e+10" in row


def test_dry_run_marks_each_cell_ready_or_missing(tmp_path, capsys, toy, monkeypatch):
    """The dry run runs the input checks of a real launch: a missing prefix is named."""
    for var in ("MCPT_STUDY_DIR", "MCPT_DATA_ROOT", "MCPT_CKPT_ROOT"):
        monkeypatch.delenv(var, raising=False)
    data, ckpts = tmp_path / "data", tmp_path / "ckpts"
    data.mkdir()
    ckpts.mkdir()
    (ckpts / "qwen2.5-7b").symlink_to(toy["pretrained"])
    links = {**toy["prefixes"], "medical_valid": toy["prefixes"]["legal_valid"]}
    for name, target in links.items():  # the legal cell has all it reads; medical_train is missing
        for ext in (".bin", ".idx", ".manifest.json"):
            (data / (name + ext)).symlink_to(target + ext)
    s = str(_study_yaml(tmp_path / "study.yaml", study_dir=str(tmp_path / "runs"),
                        data_root=str(data), checkpoint_root=str(ckpts),
                        domains=["legal", "medical"], controls=[]))
    assert main(["launch", "grid", "--study", s, "--dry-run", "--sizes", "7b",
                 "--domains", "legal", "medical"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("7b/")}
    assert rows["7b/legal"].endswith("ready") and rows["7b/medical"].endswith("missing"), out
    assert f"missing: 7b/medical: data prefix {data}/medical_train has no .bin/.idx" in out, out
    assert not (tmp_path / "runs").exists()  # nothing submitted, nothing written


# ---------------------------------------------------------------- the real local cluster
@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, toy):
    """Two tiny sizes (tiny-a at PP2, tiny-b at TP2) on the toy legal/general data."""
    from megatron_cpt.training.toy import make_toy

    root = tmp_path_factory.mktemp("slurm")
    toy_b = root / "toy-b"
    toy_b.mkdir()
    shutil.copytree(toy["tokenizer"], toy_b / "tokenizer")  # same tokenizer = same data
    b = make_toy(toy_b, model="tiny-b")
    ckpts = root / "ckpts"
    ckpts.mkdir()
    (ckpts / "tiny-a").symlink_to(toy["pretrained"])
    (ckpts / "tiny-b").symlink_to(b["pretrained"])
    exams = [str(REPO / "eval" / "exams" / f"{e}.jsonl") for e in ("legal", "general")]
    study = {
        "name": "tiny-slurm", "train_config": str(REPO / "configs" / "train" / "tiny-cpu.yaml"),
        "study_dir": str(root / "study"), "data_root": str(Path(toy["prefixes"]["legal_train"]).parent),
        "checkpoint_root": str(ckpts), "domains": ["legal"], "general": True, "controls": [],
        "budget": {"iterations": 40},
        "sizes": {"tiny-a": {"model": "tiny-a", "tp": 1, "pp": 2, "nodes": 1, "tasks_per_node": 2,
                             "time": "00:15:00", "signal_s": 30},
                  "tiny-b": {"model": "tiny-b", "tp": 2, "pp": 1, "nodes": 1, "tasks_per_node": 2,
                             "time": "00:15:00", "signal_s": 30}},
        "resources": {"gpus_per_node": 0, "tasks_per_node": 2, "cpus_per_task": 1, "mem": "2G",
                      "max_requeues": 5, "max_failures": 1},
        "eval": {"enabled": True, "exams": exams, "num_fewshot": 0, "limit": 3, "batch_size": 8,
                 "valid_sequences": 4, "time": "00:15:00", "gpus": 0, "cpus": 1, "mem": "2G"},
    }
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return {"path": path, "root": root}


def _job(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                         text=True).stdout
    return dict(t.split("=", 1) for t in out.split() if "=" in t)


def _instance_alive(job_id: str) -> bool:
    """Whether any process of the job (its previous instance's batch script) is still on the
    node: ``scontrol listpids`` lists them, run here on the cluster's only node."""
    out = subprocess.run(["scontrol", "listpids", job_id], capture_output=True, text=True).stdout
    return any(line.split()[1:2] == [job_id] for line in out.splitlines()[1:] if line.strip())


def _wait(job_id: str, timeout: float = 1800) -> dict:
    """Wait for a job to end. A requeued job waits out SLURM's requeue delay (BeginTime,
    ~2 minutes); release it instead of sleeping through it, but only once its previous
    instance has fully ended plus 3 s: slurmd refuses ("Job credential revoked") a launch
    whose credential is not newer, in whole seconds, than the revocation of the last one.
    The timeout includes queueing behind other jobs on the one node."""
    deadline, ended = time.time() + timeout, None
    while time.time() < deadline:
        job = _job(job_id)
        state = job.get("JobState", "")
        if state in FINAL_STATES:
            return job
        if state == "PENDING" and job.get("Reason") == "BeginTime":
            if _instance_alive(job_id):
                ended = None
            elif ended is None:
                ended = time.time()
            elif time.time() - ended >= 3:
                subprocess.run(["scontrol", "update", f"jobid={job_id}", "starttime=now"],
                               check=False)
        else:
            ended = None
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"job {job_id} did not finish in {timeout} s: {_job(job_id)}")


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _losses(run_dir: Path) -> dict[int, float]:
    """Loss per iteration (the last record wins: iterations redone after a resume)."""
    return {r["iteration"]: r["loss"] for r in _records(run_dir) if r["kind"] == "train"}


def _sbatch(script: Path, study_dir: Path, extra_env: dict | None = None) -> str:
    env = {**os.environ, "MCPT_PYTHON": sys.executable, "MCPT_REPO": str(REPO),
           "MCPT_STUDY_DIR": str(study_dir), "SBATCH_PARTITION": "debug",  # the overrides users set
           **(extra_env or {})}
    out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True,
                         env=env, cwd=study_dir.parent, check=True).stdout
    return out.strip().split(";")[0]


def _interrupt_mid_run(job_id: str, run_dir: Path, action: list[str], at_iteration: int = 12):
    deadline = time.time() + 300
    while time.time() < deadline:
        done = [r["iteration"] for r in _records(run_dir) if r["kind"] == "train"]
        if done and max(done) >= at_iteration:
            subprocess.run(action + [job_id], check=True)
            return max(done)
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} never reached iteration {at_iteration}")


@pytest.fixture(scope="module")
def tp2_script(slurm_cluster, tiny_study) -> Path:
    """The rendered sbatch script of the TP2 tiny cell."""
    study = StudyConfig.load(tiny_study["path"], use_env=False)
    scripts = {p.name: p for p in render_all(study, tiny_study["root"] / "scripts")}
    script = scripts["cpt_tiny-b_legal.sh"]
    assert "--ntasks-per-node=2" in script.read_text()
    return script


@pytest.fixture(scope="module")
def tp2_reference(tp2_script, tiny_study) -> dict:
    """The rendered script of the TP2 tiny cell and its uninterrupted run's losses."""
    root, script = tiny_study["root"], tp2_script
    ref_dir = root / "ref"
    t0 = time.time()
    job = _wait(_sbatch(script, ref_dir))
    ref_s = time.time() - t0
    run = ref_dir / "runs" / "tiny-b" / "legal"
    assert job["JobState"] == "COMPLETED", (job, (root / f"slurm-cpt_tiny-b_legal-{job['JobId']}.out"))
    assert job["Partition"] == "debug"
    assert json.loads((run / "exit_status.json").read_text())["code"] == 0
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000040"
    reference = _losses(run)
    assert sorted(reference) == list(range(1, 41))
    assert any(r["kind"] == "valid" and r["prefix"] == "legal" for r in _records(run))
    assert [r["decision"] for r in _history(run)] == ["finished"]
    print(f"uninterrupted TP2 sbatch run: {ref_s:.1f} s")
    return {"script": script, "losses": reference}


def _history(run_dir: Path) -> list[dict]:
    path = run_dir / "launches.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_sbatch_tp2_run_and_preemption(tp2_reference, tiny_study):
    """The rendered script of a TP2 tiny cell: the same cell as its uninterrupted run,
    requeued mid-run by `scontrol requeue` (SIGTERM) and by a signal ahead of the time limit
    (SIGUSR1, as --signal sends it): both resume and reproduce the loss sequence exactly."""
    root, script, reference = tiny_study["root"], tp2_reference["script"], tp2_reference["losses"]
    for name, action, signal_name in (("requeue", ["scontrol", "requeue"], "signal 15"),
                                      ("usr1", ["scancel", "--signal=USR1"], "signal 10")):
        study_dir = root / name
        run = study_dir / "runs" / "tiny-b" / "legal"
        job_id = _sbatch(script, study_dir)
        hit = _interrupt_mid_run(job_id, run, action)
        job = _wait(job_id)
        assert job["JobState"] == "COMPLETED", job
        assert int(job["Restarts"]) >= 1, job
        events = [r for r in _records(run) if r["kind"] == "event"]
        stops = [e for e in events if e["event"] == "stop"]
        assert stops and stops[0]["details"] == signal_name, events
        stop_it = stops[0]["iteration"]
        assert stop_it >= hit, (stop_it, hit)
        # saved at the stop step, so nothing since the signal is redone
        assert any(e["event"] == "resume" and e["iteration"] == stop_it for e in events), events
        assert _losses(run) == reference, f"{name}: resumed losses differ from the uninterrupted run"


def _crash_env(study_dir: Path, once: bool, **extra) -> dict:
    """Rank 1 of the TP2 cell exits 1 after iteration 12 (before the checkpoint of 10 is
    followed by another): every launch, or only the first (``once``)."""
    study_dir.mkdir(parents=True)
    env = {"MEGATRON_CPT_TEST_FAULT": "crash_rank@12", **extra}
    if once:
        env["MEGATRON_CPT_TEST_FAULT_ONCE"] = str(study_dir / "fault-fired")
    return env


def test_sbatch_crash_is_retried(tp2_reference, tiny_study, capsys, monkeypatch):
    """A rank killed mid-run (exit 1): the script requeues the same job, which resumes from
    the checkpoint of iteration 10 and finishes with the uninterrupted run's losses; the
    retry and its reason are in RUN/launches.jsonl and `launch status`."""
    study_dir = tiny_study["root"] / "crash"
    run = study_dir / "runs" / "tiny-b" / "legal"
    env = _crash_env(study_dir, once=True)
    job = _wait(_sbatch(tp2_reference["script"], study_dir, env))
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", job
    history = _history(run)
    assert [(h["reason"], h["decision"]) for h in history] == [("crash", "retry"),
                                                               ("done", "finished")], history
    assert history[0]["code"] != 0 and history[0]["restart"] == 0, history
    resume = next(r for r in _records(run) if r["kind"] == "event" and r["event"] == "resume")
    assert resume["iteration"] == 10, resume
    assert _losses(run) == tp2_reference["losses"], "losses after the retry differ"
    fault_to_running = resume["time"] - (study_dir / "fault-fired").stat().st_mtime
    print(f"crash_rank@12 -> resumed at 10 after {fault_to_running:.1f} s (losses ==)")
    monkeypatch.setenv("MCPT_STUDY_DIR", str(study_dir))
    capsys.readouterr()
    assert main(["launch", "status", "--study", str(tiny_study["path"]), "--json"]) == 0
    row = next(r for r in json.loads(capsys.readouterr().out) if r["cell"] == "tiny-b/legal")
    assert (row["failures"], row["retries"], row["state"]) == (1, 1, "DONE"), row


def _chain_afterok(after: str, study_dir: Path) -> str:
    """A job chained afterok on ``after``, as `launch grid` chains the evaluation."""
    return subprocess.run(["sbatch", "--parsable", f"--dependency=afterok:{after}",
                           "--output=/dev/null", "--wrap", f"touch {study_dir}/eval-ran"],
                          capture_output=True, text=True, check=True).stdout.strip()


def _assert_never_runs(job_id: str, marker: Path | None = None) -> None:
    for _ in range(30):
        job = _job(job_id)
        if job.get("Reason") == "DependencyNeverSatisfied" or job.get("JobState") == "CANCELLED":
            break
        time.sleep(1)
    subprocess.run(["scancel", job_id], check=False)
    assert job.get("Reason") == "DependencyNeverSatisfied" or job.get("JobState") == "CANCELLED", job
    assert marker is None or not marker.exists()


def test_sbatch_crash_not_retried_past_max_failures_or_when_refused(tp2_script, tiny_study):
    """Crashing on every launch: one retry (max_failures 1), then the job ends FAILED. A job
    SLURM will not requeue (submitted non-requeueable): the retry is refused, the job ends
    FAILED. In both, a job chained afterok never runs."""
    root = tiny_study["root"]
    cases = (("exhausted", {}, ["retry", "failed"], "max_failures 1"),
             ("refused", {"SBATCH_NO_REQUEUE": "1"}, ["retry", "failed"], "scontrol requeue refused"))
    for name, extra, decisions, note in cases:
        study_dir = root / name
        run = study_dir / "runs" / "tiny-b" / "legal"
        job_id = _sbatch(tp2_script, study_dir, _crash_env(study_dir, False, **extra))
        dependent = _chain_afterok(job_id, study_dir)
        job = _wait(job_id)
        assert job["JobState"] == "FAILED" and job["ExitCode"] != "0:0", (name, job)
        history = _history(run)
        assert [h["decision"] for h in history] == decisions, (name, history)
        assert note in history[-1]["note"], (name, history)
        _assert_never_runs(dependent, study_dir / "eval-ran")


def test_local_executor_requeues_in_place(tiny_study, capsys, monkeypatch):
    """`launch grid --executor local` (no SLURM): a cell that stops early with exit 42 (here
    every 15 iterations) is started again in place until its budget is spent."""
    raw = yaml.safe_load(tiny_study["path"].read_text())
    raw["sizes"] = {"tiny-a": {**raw["sizes"]["tiny-a"],
                               "overrides": ["train.stop_after_iterations=15"]}}
    path = tiny_study["root"] / "study-local.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("MCPT_STUDY_DIR", str(tiny_study["root"] / "local"))
    assert main(["launch", "grid", "--study", str(path), "--executor", "local",
                 "--domains", "legal", "--no-eval"]) == 0
    launches = json.loads((tiny_study["root"] / "local" / "launches.json").read_text())
    assert launches["tiny-a/legal"]["restarts"] == 2  # 15 + 15 + 10 iterations
    capsys.readouterr()
    assert main(["launch", "status", "--study", str(path), "--json"]) == 0
    row = next(r for r in json.loads(capsys.readouterr().out) if r["cell"] == "tiny-a/legal")
    assert row["state"] == "DONE" and row["iteration"] == 40 and row["requeues"] == 2, row
    # launching the grid again submits nothing for a finished cell
    assert main(["launch", "grid", "--study", str(path), "--executor", "local",
                 "--domains", "legal", "--no-eval"]) == 0
    assert "tiny-a/legal             not submitted: done" in capsys.readouterr().out
    again = json.loads((tiny_study["root"] / "local" / "launches.json").read_text())
    assert again == launches


def test_submitit_cell_requeues_the_same_job(slurm_cluster, tiny_study, capsys, monkeypatch):
    """`launch grid` on SLURM: a cell that stops early with exit 42 (here every 15 iterations)
    is requeued by its TrainCell as the same job id (so an `afterok` evaluation would still
    wait for it) and resumes until its budget is spent."""
    raw = yaml.safe_load(tiny_study["path"].read_text())
    raw["sizes"] = {"tiny-a": {**raw["sizes"]["tiny-a"],
                               "overrides": ["train.stop_after_iterations=15"]}}
    path = tiny_study["root"] / "study-requeue.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("MCPT_STUDY_DIR", str(tiny_study["root"] / "grid-requeue"))
    assert main(["launch", "grid", "--study", str(path), "--domains", "legal", "--no-eval"]) == 0
    launches = json.loads((tiny_study["root"] / "grid-requeue" / "launches.json").read_text())
    # a second launch while the cell is queued or running must not start a second job on
    # the same run folder
    capsys.readouterr()
    assert main(["launch", "grid", "--study", str(path), "--domains", "legal", "--no-eval"]) == 0
    assert f"not submitted: job {launches['tiny-a/legal']['train_job']} is" in capsys.readouterr().out
    job = _wait(launches["tiny-a/legal"]["train_job"])
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "2", job
    capsys.readouterr()
    assert main(["launch", "status", "--study", str(path), "--json"]) == 0
    row = next(r for r in json.loads(capsys.readouterr().out) if r["cell"] == "tiny-a/legal")
    assert row["state"] == "COMPLETED" and row["iteration"] == 40 and row["requeues"] == 2, row


def test_grid_does_not_submit_a_cell_whose_job_state_is_unknown(slurm_cluster, tiny_study, capsys,
                                                                  monkeypatch, tmp_path):
    """A real `scontrol` that cannot reach its controller (a copy of the cluster's config
    with another port): the job may still run, so the cell is not submitted again."""
    conf = tmp_path / "unreachable.conf"
    lines = [x for x in Path(slurm_cluster).read_text().splitlines()
             if not x.startswith(("SlurmctldPort=", "MessageTimeout="))]
    conf.write_text("\n".join(lines + ["SlurmctldPort=6999", "MessageTimeout=2"]) + "\n")
    study_dir = tiny_study["root"] / "grid-unknown"
    study_dir.mkdir()
    entry = {"train_job": "424242", "executor": "slurm", "submitted": time.time()}
    (study_dir / "launches.json").write_text(json.dumps({"tiny-a/legal": entry}))
    monkeypatch.setenv("MCPT_STUDY_DIR", str(study_dir))
    monkeypatch.setenv("SLURM_CONF", str(conf))
    assert main(["launch", "grid", "--study", str(tiny_study["path"]), "--sizes", "tiny-a",
                 "--domains", "legal", "--no-eval"]) == 0
    out = capsys.readouterr().out
    assert "tiny-a/legal" in out and "not submitted: state of job 424242 unknown" in out, out
    assert "Unable to contact slurm controller" in out, out
    assert json.loads((study_dir / "launches.json").read_text()) == {"tiny-a/legal": entry}
    assert main(["launch", "status", "--study", str(tiny_study["path"])]) == 0
    row = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("tiny-a/legal"))
    assert "UNKNOWN" in row, row


def test_submitit_refused_requeue_fails(slurm_cluster, tiny_study, capsys, monkeypatch):
    """`launch grid` of a cell SLURM will not requeue (submitted non-requeueable): its stop
    for requeue (exit 42 after 15 iterations) cannot be requeued, so the TrainCell fails
    instead of sleeping and returning: the job ends FAILED and its afterok evaluation never runs."""
    raw = yaml.safe_load(tiny_study["path"].read_text())
    raw["sizes"] = {"tiny-a": {**raw["sizes"]["tiny-a"],
                               "overrides": ["train.stop_after_iterations=15"]}}
    path = tiny_study["root"] / "study-refused.yaml"
    path.write_text(yaml.safe_dump(raw))
    study_dir = tiny_study["root"] / "grid-refused"
    monkeypatch.setenv("MCPT_STUDY_DIR", str(study_dir))
    monkeypatch.setenv("SBATCH_NO_REQUEUE", "1")  # read by sbatch, over the script's --requeue
    assert main(["launch", "grid", "--study", str(path), "--domains", "legal"]) == 0
    entry = json.loads((study_dir / "launches.json").read_text())["tiny-a/legal"]
    job = _wait(entry["train_job"])
    assert job["JobState"] == "FAILED" and job["Restarts"] == "0", job
    history = _history(study_dir / "runs" / "tiny-a" / "legal")
    assert [(h["code"], h["decision"]) for h in history] == [(42, "requeue"), (42, "failed")], history
    assert history[-1]["note"] == "scontrol requeue refused", history
    _assert_never_runs(entry["eval_job"])


def test_local_cluster_script_acts_only_on_its_own_daemons(tmp_path):
    """slurm/local/cluster.sh refuses to start beside a SLURM it did not start and stops only
    the daemons in its pid files (here stand-in processes named slurmctld / slurmd)."""
    script = REPO / "slurm" / "local" / "cluster.sh"
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    env["SLURM_LOCAL_DIR"] = str(tmp_path / "state")
    (tmp_path / "state").mkdir()

    def run(*args, **extra):
        return subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                              env={**env, **extra}, timeout=60)

    out = run("start", SLURM_CONF=str(tmp_path / "elsewhere.conf"))
    assert out.returncode == 1 and "refusing to start" in out.stderr, out
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    daemons = {}
    for name in ("slurmctld", "slurmd"):
        shutil.copy(shutil.which("sleep"), tmp_path / name)
        daemons[name] = subprocess.Popen([str(tmp_path / name), "300"])
    try:
        out = run("start")
        assert out.returncode == 1 and "refusing to start" in out.stderr, out
        # only the slurmd is "ours": stop ends it and leaves the foreign slurmctld alone
        (tmp_path / "state" / "slurmd.pid").write_text(f"{daemons['slurmd'].pid}\n")
        assert run("stop").returncode == 0
        assert daemons["slurmd"].wait(timeout=20) is not None
        assert daemons["slurmctld"].poll() is None
        assert not (tmp_path / "state" / "slurmd.pid").exists()
    finally:
        for proc in daemons.values():
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- rank health, hang watchdog
HANG_TIMEOUT_MIN = 0.3


@pytest.fixture(scope="module")
def dp_cell(tiny_study):
    """tiny-a at DP2 (one node, two ranks that work independently until the gradient
    reduction), 20 iterations, a short hang watchdog; its rendered sbatch script."""
    raw = yaml.safe_load(tiny_study["path"].read_text())
    raw["budget"] = {"iterations": 20}
    raw["general"] = False
    raw["sizes"] = {"tiny-dp": {**raw["sizes"]["tiny-a"], "pp": 1, "overrides": [
        f"train.hang_timeout_min={HANG_TIMEOUT_MIN}", "train.collective_timeout_min=2"]}}
    path = tiny_study["root"] / "study-dp.yaml"
    path.write_text(yaml.safe_dump(raw))
    scripts = render_all(StudyConfig.load(path, use_env=False), tiny_study["root"] / "scripts-dp")
    return {"path": path, "script": next(p for p in scripts if p.name == "cpt_tiny-dp_legal.sh")}


def _sbatch_fault(script: Path, study_dir: Path, fault: str) -> str:
    """Submit with a test fault (fault_hooks.py) in the job's environment."""
    os.environ["MEGATRON_CPT_TEST_FAULT"] = fault
    try:
        return _sbatch(script, study_dir)
    finally:
        del os.environ["MEGATRON_CPT_TEST_FAULT"]


@pytest.fixture(scope="module")
def straggler_run(slurm_cluster, dp_cell, tiny_study):
    """The DP2 cell through sbatch with rank 1 sleeping SLOW_S (1 s) before each step: it runs
    through (losses of an unfaulted run: sleeping changes no arithmetic)."""
    study_dir = tiny_study["root"] / "straggler"
    t0 = time.time()
    job = _wait(_sbatch_fault(dp_cell["script"], study_dir, "slow_rank@1"), timeout=1200)
    run = study_dir / "runs" / "tiny-dp" / "legal"
    assert job["JobState"] == "COMPLETED", (job, _records(run)[-3:])
    print(f"DP2 sbatch run with a slowed rank: {time.time() - t0:.1f} s")
    return {"run": run, "study_dir": study_dir, "losses": _losses(run)}


def test_straggler_event_names_the_slowed_rank(straggler_run, dp_cell, capsys, monkeypatch):
    """Each logged step carries the slowest / fastest rank's own step time and peak memory;
    rank 1, slowed by the fault hook, is reported as a straggler and by `launch status`."""
    run = straggler_run["run"]
    trains = [r for r in _records(run) if r["kind"] == "train"]
    assert sorted(straggler_run["losses"]) == list(range(1, 21))
    assert all(r["peak_mem_gb"] > 0.05 and r["rank_time_max_s"] >= r["rank_time_min_s"]
               for r in trains), trains[-1]
    slowest = [r["slowest_rank"] for r in trains]
    assert slowest.count(1) >= 15, slowest
    assert all(r["rank_time_max_s"] >= SLOW_S for r in trains), trains  # rank 1's sleep
    stragglers = [r for r in _records(run) if r.get("event") == "straggler"]
    assert stragglers and {e["rank"] for e in stragglers} == {1}, stragglers
    monkeypatch.setenv("MCPT_STUDY_DIR", str(straggler_run["study_dir"]))
    capsys.readouterr()
    assert main(["launch", "status", "--study", str(dp_cell["path"])]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("tiny-dp/legal"))
    assert "slow r1 " in row and "fast r0 " in row and "stragglers" in row and "(r1)" in row, row


def test_hang_watchdog_reports_every_rank_and_the_cell_resumes(straggler_run, dp_cell,
                                                                tiny_study):
    """The last rank stops before iteration 13 (as a rank stuck in a dead collective): within
    train.hang_timeout_min every rank writes its stacks and last collective to RUN/hang/, the
    job ends with exit 4 (hang), is requeued as the same job id, resumes from the checkpoint
    of iteration 10 and finishes with the losses of the run that never hung."""
    study_dir = tiny_study["root"] / "hang"
    run = study_dir / "runs" / "tiny-dp" / "legal"
    job_id = _sbatch_fault(dp_cell["script"], study_dir, "hang@13")
    job = _wait(job_id, timeout=1200)
    if job["JobState"] == "FAILED":  # no automatic crash retry in this script: requeue as it would
        assert job["ExitCode"] == "4:0", job
        assert json.loads((run / "exit_status.json").read_text())["reason"] == "hang"
        subprocess.run(["scontrol", "requeue", job_id], check=True)
        job = _wait(job_id, timeout=1200)
    assert job["JobState"] == "COMPLETED" and int(job["Restarts"]) >= 1, job
    reports = sorted((run / "hang").glob("rank_*.txt"))
    assert [p.name for p in reports] == ["rank_00000.txt", "rank_00001.txt"]
    texts = [p.read_text() for p in reports]
    assert all("after iteration 12" in t and "last collective entered: #" in t
               and "Thread 0x" in t for t in texts), texts
    assert "in hang_forever" in texts[1] and "in forward_backward" in texts[1]  # the hung rank
    assert "gradient reduction" in texts[0] and "in finalize_model_grads" in texts[0]  # its peer
    records = _records(run)
    hung_at = min(r["time"] for r in records if r["kind"] == "train" and r["iteration"] == 12)
    fired = min(p.stat().st_mtime for p in reports)
    resumed = next(r for r in records if r.get("event") == "resume")
    assert resumed["iteration"] == 10, resumed
    assert HANG_TIMEOUT_MIN * 60 - 1 <= fired - hung_at <= HANG_TIMEOUT_MIN * 60 + 10, fired - hung_at
    assert _losses(run) == straggler_run["losses"], "losses after the hang differ"
    print(f"hang: watchdog fired {fired - hung_at:.1f} s after the last step; running again "
          f"(resume event) {resumed['time'] - hung_at:.1f} s after it")
