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


def _wandb_records(path: Path) -> list[dict]:
    """Every record of one offline run file, read with wandb's own reader
    (``wandb leet inspect --json``: wandb-core's transaction-log scanner)."""
    out = subprocess.run([str(BIN / "wandb"), "leet", "inspect", "--json", str(path)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def _wandb_history(wandb_dir: Path, rid: str) -> tuple[list[dict], list[Path]]:
    """Every history row of the offline run files of ``rid``."""
    rows = []
    files = sorted(wandb_dir.glob(f"wandb/offline-run-*-{rid}/run-{rid}.wandb"))
    for path in files:
        rows += [rec["history"]["item"] for rec in _wandb_records(path)
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


# ----------------------------------------------------------------------------- report --log-to
@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """test_report's synthetic study (hand-built eval files, no models); its name: synthetic."""
    from test_report import make_study

    return make_study(tmp_path_factory.mktemp("study"))


def _report(study: Path, out: Path, *extra: str) -> int:
    from megatron_cpt.cli import main

    return main(["report", "--study", str(study), "--out", str(out), "--bootstrap", "20", *extra])


def test_report_logged_to_mlflow_file_store(study, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from megatron_cpt.report.render import SUMMARY_HEAD, summary_rows

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri, out = f"file://{tmp_path}/mlruns", tmp_path / "report"
    for _ in range(2):  # a re-run into the same folder updates the same tracked run
        assert _report(study, out, "--log-to", "mlflow", "--mlflow-tracking-uri", uri) == 0
    results = json.loads((out / "results.json").read_text())
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("synthetic").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == "report"
    assert runs[0].data.tags["kind"] == "report" and runs[0].data.tags["study"] == "synthetic"
    assert runs[0].info.status == "FINISHED"
    mid = runs[0].info.run_id
    listed = {a.path for a in client.list_artifacts(mid)}
    assert {"report.md", "report.html", "results.json", "summary_table.json",
            *results["plots"]} <= listed and "sger_vs_size.png" in listed
    metrics = runs[0].data.metrics
    assert metrics["sger/1b/legal"] == results["cells"]["1b/legal"]["sger"]["value"] == 4.0
    assert metrics["fit_exponent/legal/sger"] == results["fits"]["legal"]["sger"]["b"]
    assert "sger/8b/legal" not in metrics  # undefined (no general run): left out
    table = json.loads(Path(client.download_artifacts(mid, "summary_table.json", str(tmp_path)))
                       .read_text())
    assert table == {"columns": SUMMARY_HEAD, "data": summary_rows(results)}


def test_report_logged_to_wandb_offline_where_the_runs_log(study, tmp_path, monkeypatch):
    import shutil

    from megatron_cpt.report.render import SUMMARY_HEAD, summary_rows

    copy = tmp_path / "study"
    shutil.copytree(study, copy)
    for d in copy.glob("runs/*/*"):  # as a study whose base config turned W&B on
        if (d / "config.yaml").is_file():
            with (d / "config.yaml").open("a") as fh:
                fh.write("logging:\n  wandb: {project: cpt-test, mode: offline}\n")
    for key in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    for key in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):  # staging, not $HOME
        monkeypatch.setenv(key, str(tmp_path / key.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "report"
    assert _report(copy, out, "--log-to", "wandb") == 0
    results = json.loads((out / "results.json").read_text())
    files = sorted(out.glob("wandb/offline-run-*-report-synthetic-*/run-*.wandb"))
    assert len(files) == 1
    recs = _wandb_records(files[0])
    run = next(r["run"] for r in recs if r["type"] == "run")
    assert run["project"] == "cpt-test" and run["run_group"] == "synthetic"
    assert run["display_name"] == "report" and "kind:report" in run["tags"]
    summary = {k: v for r in recs if r["type"] == "summary"
               for k, v in r["summary"]["update"].items()}
    assert summary["sger/1b/legal"] == results["cells"]["1b/legal"]["sger"]["value"]
    assert summary["sger_control/1b/legal"] == results["cells"]["1b/legal"]["sger_control"]["value"]
    history = [r["history"]["item"] for r in recs if r["type"] == "history"]
    table = json.loads((files[0].parent / "files" / history[0]["summary_table.path"]).read_text())
    assert table["columns"] == SUMMARY_HEAD and table["data"] == summary_rows(results)
    artifact = next(r["artifact"] for r in recs if r["type"] == "artifact"
                    and r["artifact"]["type"] == "report")
    assert artifact["name"] == "report-synthetic"
    assert {c["path"] for c in artifact["manifest"]["contents"]} == {
        "report.md", "report.html", "results.json", *results["plots"]}


def test_report_tracker_failure_is_one_warning_after_the_report(study, tmp_path, capsys):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the MLflow store folder should be")
    args = ("--log-to", "mlflow", "--mlflow-tracking-uri", f"file://{blocker}/mlruns")
    for strict, code in ((False, 0), (True, 1)):
        out = tmp_path / f"report-{strict}"
        assert _report(study, out, *args, *(["--strict"] if strict else [])) == code
        assert (out / "report.md").is_file() and (out / "results.json").is_file()
        warnings = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
        assert len(warnings) == 1, warnings
        assert warnings[0].startswith("megatron-cpt report: warning: logging to mlflow failed (")
        assert warnings[0].endswith(f"the report is in {out} only")


@pytest.mark.parametrize("args, message", [
    (["--log-to", "mlflow"], "--log-to mlflow needs --mlflow-tracking-uri: no run of the study "
     "sets logging.mlflow.tracking_uri and MLFLOW_TRACKING_URI is not set"),
    (["--log-to", "wandb"], "--log-to wandb needs --wandb-project"),
    (["--log-to", "mlflow", "--mlflow-tracking-uri", "ftp://host/x"], "MLflow tracking URI "
     "'ftp://host/x': scheme unknown"),
    (["--wandb-project", "p"], "--wandb-project needs --log-to wandb"),
])
def test_report_tracking_settings_refused_before_any_work(study, tmp_path, capsys, monkeypatch,
                                                          args, message):
    for key in ("MLFLOW_TRACKING_URI", "WANDB_PROJECT"):
        monkeypatch.delenv(key, raising=False)
    assert _report(study, tmp_path / "report", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"megatron-cpt report: error: {message}"), err
    assert not (tmp_path / "report").exists()


def test_report_unknown_tracker_is_an_argparse_error(study, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _report(study, tmp_path / "report", "--log-to", "neptune")
    assert exc.value.code == 2
    assert "argument --log-to: invalid choice: 'neptune'" in capsys.readouterr().err


def test_mlflow_experiment_created_by_a_racing_cell_is_used(tmp_path, monkeypatch):
    """Cells of a grid start at once: when another cell creates the experiment between our
    lookup and our create, MLflow refuses the create and we use the existing experiment (a
    real file store; the lookup that misses it is the only thing staged)."""
    from mlflow.tracking import MlflowClient

    from megatron_cpt.training.tracking import experiment_id

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file://{tmp_path}/mlruns"
    theirs = MlflowClient(tracking_uri=uri).create_experiment("study-x")

    class LateLookup(MlflowClient):
        missed = False

        def get_experiment_by_name(self, name):
            if not self.missed:  # the lookup ran before the other cell's create
                self.missed = True
                return None
            return super().get_experiment_by_name(name)

    assert experiment_id(LateLookup(tracking_uri=uri), "study-x") == theirs
    assert experiment_id(MlflowClient(tracking_uri=uri), "study-y") != theirs  # created
