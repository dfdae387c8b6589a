"""Experiment tracking (issue 28) with the real libraries, no network: W&B offline (its own
``.wandb`` files read back with wandb's reader) and MLflow's local file store (read back
with MLflow's client). A 6-iteration tiny run SIGTERMed and relaunched is one tracked run
with each iteration logged once, equal to metrics.jsonl; a tracker that cannot start leaves
the losses of an untracked run and one ``tracking_disabled`` event.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from test_train import BIN, _args, _cmd, _ok, launch, losses, records

ITERS = ["budget.iterations=6", "validation.interval_tokens=1536"]  # valid at 3 and 6


def _tracked(tmp: Path) -> tuple[list[str], dict]:
    over = ["logging.wandb.project=cpt-test", "logging.wandb.mode=offline",
            "logging.wandb.group=study-a", f"logging.mlflow.tracking_uri=file://{tmp}/mlruns",
            "logging.mlflow.experiment=study-a", "logging.tags={size: tiny, domain: legal}"]
    return over, {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp / "wb"),
                  "WANDB_SILENT": "true"}


@pytest.fixture(scope="module")
def untracked(toy, tmp_path_factory) -> dict[int, float]:
    run_dir = tmp_path_factory.mktemp("untracked") / "run"
    _ok(launch(toy, 1, run_dir, ITERS))
    return losses(run_dir)


def _sigterm_after(toy, run_dir: Path, extra: list[str], env: dict, n_train: int) -> int:
    """Launch, SIGTERM the trainer once ``n_train`` train records exist; its exit code."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", **env, "MEGATRON_CPT_TEST_FAULT": "slow_steps@2"}
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(_cmd(1) + _args(toy, run_dir, extra), env=e, stdout=log,
                                stderr=subprocess.STDOUT, cwd=Path(__file__).parents[1])
        deadline, metrics = time.time() + 240, run_dir / "metrics.jsonl"
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and metrics.read_text().count('"train"') >= n_train:
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=240)
        log.seek(0)
        assert code == 42, log.read()[-3000:]
    return code


def _last(run_dir: Path, kind: str, key: str = "loss") -> dict[tuple, float]:
    """metrics.jsonl's last value per (iteration, prefix)."""
    return {(r["iteration"], r.get("prefix")): r[key] for r in records(run_dir, kind)}


def _wandb_history(wandb_dir: Path, rid: str) -> tuple[list[dict], list[Path]]:
    """Every history row of the offline run files of ``rid``, read with wandb's own reader
    (``wandb leet inspect --json``: wandb-core's transaction-log scanner)."""
    rows = []
    files = sorted(wandb_dir.glob(f"wandb/offline-run-*-{rid}/run-{rid}.wandb"))
    for path in files:
        out = subprocess.run([str(BIN / "wandb"), "leet", "inspect", "--json", str(path)],
                             capture_output=True, text=True, timeout=120, check=True).stdout
        rows += [rec["history"]["item"] for rec in map(json.loads, out.splitlines())
                 if rec.get("type") == "history"]
    return rows, files


def test_sigterm_and_relaunch_log_each_iteration_once_to_one_run(toy, untracked, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the local store, read back here
    run_dir = tmp_path / "run"
    over, env = _tracked(tmp_path)
    _sigterm_after(toy, run_dir, ITERS + over, env, n_train=2)
    stopped = json.loads((run_dir / "exit_status.json").read_text())["iteration"]
    rid = json.loads((run_dir / "run.json").read_text())["tracking_run_id"]
    assert 2 <= stopped < 6
    _ok(launch(toy, 1, run_dir, ITERS + over, env=env))
    assert json.loads((run_dir / "run.json").read_text())["tracking_run_id"] == rid
    assert losses(run_dir) == untracked  # tracking changes nothing
    assert not [r for r in records(run_dir, "event") if r["event"] == "tracking_disabled"]
    train, valid = _last(run_dir, "train"), _last(run_dir, "valid")
    lrs = _last(run_dir, "train", "lr")

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file://{tmp_path}/mlruns")
    exp = client.get_experiment_by_name("study-a")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["megatron_cpt.run_id"] == rid
    assert runs[0].data.tags["size"] == "tiny" and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["config.budget.iterations"] == "6"
    mid = runs[0].info.run_id
    hist = client.get_metric_history(mid, "train/loss")
    assert sorted(m.step for m in hist) == [1, 2, 3, 4, 5, 6]  # each once across 2 launches
    assert {(m.step, None): m.value for m in hist} == train
    assert {(m.step, None): m.value for m in client.get_metric_history(mid, "train/lr")} == lrs
    for prefix in ("legal", "general"):
        got = {(m.step, prefix): m.value
               for m in client.get_metric_history(mid, f"valid/{prefix}/loss")}
        assert got == {k: v for k, v in valid.items() if k[1] == prefix}
    tokens = client.get_metric_history(mid, "tokens")
    assert {m.step: m.value for m in tokens} == {
        r["iteration"]: r["tokens"] for r in records(run_dir) + records(run_dir, "valid")}

    rows, files = _wandb_history(Path(env["WANDB_DIR"]), rid)
    assert len(files) == 2  # one offline file per launch, both of run `rid`
    steps = [r["_step"] for r in rows if "train/loss" in r]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    assert {(r["_step"], None): r["train/loss"] for r in rows if "train/loss" in r} == train
    assert {(r["_step"], "legal"): r["valid/legal/loss"] for r in rows
            if "valid/legal/loss" in r} == {k: v for k, v in valid.items() if k[1] == "legal"}
    all_steps = [r["_step"] for r in rows]
    assert all_steps == sorted(all_steps)  # never a step that goes back

    # `eval run` scores of the checkpoint of iteration 3, after training went to 6: same run
    from megatron_cpt.run_folder import RunFolder
    from megatron_cpt.training.tracking import EvalTracking

    for key, value in env.items():  # this process is the eval one now
        monkeypatch.setenv(key, value)
    warned = []
    tracked = EvalTracking(RunFolder(run_dir), warn=warned.append)
    tracked.log({"iteration": 3, "exams": {"legal": {"test": {"acc": 0.25, "n": 8}}},
                 "valid": {"legal": {"loss": 2.5, "ppl": 12.2}}})
    tracked.close()
    assert warned == [] and len(client.search_runs([exp.experiment_id])) == 1
    assert [(m.step, m.value) for m in client.get_metric_history(mid, "eval/legal/test/acc")] \
        == [(3, 0.25)]
    assert client.get_run(mid).info.status == "FINISHED"
    rows, files = _wandb_history(Path(env["WANDB_DIR"]), rid)
    assert len(files) == 3
    assert [(r["eval/iteration"], r["eval/legal/test/acc"], r["eval/valid/legal/loss"])
            for r in rows if "eval/iteration" in r] == [(3, 0.25, 2.5)]


def test_study_cells_share_one_group_and_carry_their_tags():
    from megatron_cpt.launch.study import StudyConfig

    study = StudyConfig.load(Path(__file__).parents[1] / "configs" / "study-demo.yaml")
    seen = set()
    for cell in study.cells():
        lg = cell.train_config().logging
        assert lg.wandb.group == study.name and lg.mlflow.experiment == study.name
        assert lg.tags == {"study": study.name, "size": cell.size.name, "cell": cell.corpus,
                           "kind": cell.kind, "domain": cell.domain or "general"}
        seen.add(lg.tags["kind"])
    assert seen == {"general", "domain", "control", "replay"}


def test_tracker_that_cannot_start_is_one_event_and_changes_no_loss(toy, untracked, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the MLflow store folder should be")
    run_dir = tmp_path / "run"
    proc = launch(toy, 1, run_dir, ITERS + [f"logging.mlflow.tracking_uri=file://{blocker}/mlruns"])
    _ok(proc)
    assert losses(run_dir) == untracked
    disabled = [r for r in records(run_dir, "event") if r["event"] == "tracking_disabled"]
    assert len(disabled) == 1 and disabled[0]["details"].startswith("mlflow: could not start")
    assert disabled[0]["iteration"] == 0
    warnings = [ln for ln in proc.stderr.splitlines() if "mlflow tracking" in ln]
    assert len(warnings) == 1 and "training goes on" in warnings[0], proc.stderr[-2000:]


@pytest.mark.parametrize("override, message", [
    ("logging.wandb.mode=cloud", "logging.wandb.mode 'cloud' unknown; choose online or offline"),
    ("logging.mlflow.tracking_uri=ftp://host/x", "logging.mlflow.tracking_uri 'ftp://host/x': "
     "scheme unknown"),
])
def test_tracking_settings_are_checked_with_the_config(override, message):
    from megatron_cpt.errors import UsageError
    from megatron_cpt.training.config import TrainConfig

    with pytest.raises(UsageError) as err:
        TrainConfig.load(Path(__file__).parents[1] / "configs" / "train" / "tiny-cpu.yaml", [override])
    assert str(err.value).startswith(message)
