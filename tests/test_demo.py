"""The demo end to end on the real local SLURM cluster: data prep, base models, the grid
through `launch grid` (job arrays per size, evaluation chained afterok), `launch status`, and
the report, which must show the effect the study is about at toy scale: specialized runs reach
a lower domain validation loss than the general run at equal compute, and (the study's own
metric) beat the base model and the general run on their domain's exam; and the replay cells
(legal with 25 % general data) train on the declared mix and feed the report's mixture law and
replay recommendation. One demo run serves every test here (module fixture); the
reproducibility test reruns part of its grid."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO
from test_slurm import _job

SIZES = ("tiny-a", "tiny-c", "tiny-b")
REPLAY = "legal_replay25"  # legal with general fraction 0.25 (configs/study-demo.yaml replay:)
# the full demo: 3 sizes x 5 cells
CORPORA = ["general", "legal", "medical", "control_legal", REPLAY]


def _env() -> dict:
    """The environment at call time: the slurm_cluster fixture exports SLURM_CONF."""
    return {**os.environ, "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def demo(slurm_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "megatron_cpt", "demo", "--out", str(out),
                           "--executor", "slurm", "--domains", *CORPORA, "--bootstrap", "200",
                           "--mlflow"],
                          capture_output=True, text=True, cwd=REPO, env=_env(), timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"demo ({3 * len(CORPORA)} cells) on the local SLURM cluster: {time.time() - t0:.0f} s")
    (out.parent / "demo_stdout.txt").write_text(proc.stdout)
    return out


def _results(study) -> dict:
    return json.loads((study / "report" / "results.json").read_text())


def test_demo_grid_on_slurm_shows_the_effect(demo):
    out, corpora, env = demo, CORPORA, _env()
    study = out / "study"

    # the grid went through SLURM: one array per size, evaluation afterok on its element
    launches = json.loads((study / "launches.json").read_text())
    assert len(launches) == 3 * len(CORPORA)
    for size in SIZES:
        arrays = {launches[f"{size}/{c}"]["train_job"].split("_")[0] for c in corpora}
        assert len(arrays) == 1, launches
    for entry in launches.values():
        job, train = _job(entry["eval_job"]), _job(entry["train_job"])
        assert job.get("JobState") == "COMPLETED" and train.get("JobState") == "COMPLETED", \
            (job, train)
        # SLURM clears a satisfied dependency ("(null)"), so check what afterok guarantees:
        # the evaluation, submitted with its training, started only after training ended OK
        assert job["StartTime"] >= train["EndTime"], (job, train)  # ISO 8601 strings
        assert job["SubmitTime"] <= train["EndTime"], (job, train)  # it was held, not late

    # launch status: every cell done and evaluated
    status = subprocess.run(
        [sys.executable, "-m", "megatron_cpt", "launch", "status", "--study",
         str(REPO / "configs" / "study-demo.yaml"), "--json"], capture_output=True, text=True,
        cwd=REPO, env={**env, "MCPT_STUDY_DIR": str(study)}, check=True)
    rows = {r["cell"]: r for r in json.loads(status.stdout)}
    for size in SIZES:
        for corpus in corpora:
            row = rows[f"{size}/{corpus}"]
            assert row["state"] in ("COMPLETED", "DONE"), row
            assert row["iteration"] == row["iterations"] == 120, row
            assert row["eval_state"] in ("COMPLETED", "5 scored"), row

    # the report shows the effect, and lists the cells the reduced grid left out
    results = _results(study)
    for size in SIZES:
        cell = results["cells"][f"{size}/legal"]
        effect = cell["domain_valid_loss_at_equal_compute"]
        assert len(effect["flops"]) == 4, effect
        assert effect["specialized_lower_everywhere"], effect
        assert all(s < g for s, g in zip(effect["specialized"], effect["general"])), effect
        assert cell["domain_valid_loss_vs_control"]["specialized_lower_everywhere"], cell
        assert cell["sger_domain_loss"]["value"] > 1.0, cell["sger_domain_loss"]
    assert results["summary"]["domain_valid_loss"]["all_cells_lower_everywhere"] is True
    md = (study / "report" / "report.md").read_text()
    assert "SGER" in md and "domain_loss_tiny-b.png" in md
    assert "data:image/png;base64" in (study / "report" / "report.html").read_text()
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["executor"] == "slurm"
    print(f"demo stage times: {summary['timings_s']}")


def test_demo_exams_move(demo):
    """The study's own metric at toy scale, on the primary formulation (CF at these sizes),
    measured on 30 test questions per exam (so only effects of ~0.15 or more show). In every
    size, at least one domain has both:
    - a specialized run above the base model on the domain's test exam (paired bootstrap CI of
      the test accuracy gain excludes 0, i.e. excludes the base score), and
    - a numeric exam SGER > 1 (the general run improved on val and the specialized run reached
      its best with less compute);
    and the legal SGER is fitted over 3 sizes with a bootstrap CI (a residual exists).
    The corpora state the exams' knowledge, yet the 13-gram decontamination found no
    val/test question in them."""
    results = _results(demo / "study")
    assert json.loads((demo / "demo_summary.json").read_text())["decontamination"][
        "val_test_hits"] == 0
    shown = {}
    for size in SIZES:
        cells = [results["cells"][f"{size}/{d}"] for d in ("legal", "medical")]
        for cell in cells:
            assert cell["formulation"]["primary"] == "cf", cell["formulation"]
            assert set(cell["formulations"]) == {"mcf", "cf"}
            assert cell["formulations"]["mcf"]["base"]["test_answer_ppl"] > 1.0
        both = [c["domain"] for c in cells
                if c["bootstrap"]["test_gain_over_base"]["gain_ci"][0] > 0
                and (c["sger"]["value"] or 0) > 1.0]
        assert both, (size, [(c["bootstrap"]["test_gain_over_base"], c["sger"]) for c in cells])
        shown[size] = both
    fit = results["fits"]["legal"]["sger"]
    assert fit["sizes_used"] == 3 and fit["a_ci"] is not None, fit  # a residual and a CI
    md = (demo / "study" / "report" / "report.md").read_text()
    assert md.index("## Findings") < md.index("## Plots") < md.index("## Summary")
    print(f"domains with exam SGER > 1 and a CF test gain above base, per size: {shown}")


def test_demo_replay_cells_and_the_mixture_law(demo):
    """The replay cells train on the declared mix: data_blend.json (the samples the run
    consumed from each prefix, read from Megatron's blend index) holds 25 % general samples to
    within one sample (the blend's granularity). The report fits the mixture law over the
    legal, general and replay cells (3 sizes x 3 general fractions x 4 checkpoints: the
    9-parameter form), gives each loss's held-out (leave-one-cell-out) error, and per size a
    recommended general fraction with its CI or, where the CI is unbounded, "not determinable
    from this grid"; the demo prints the same."""
    from megatron_cpt.report.mixture import NOT_DETERMINABLE
    from megatron_cpt.run_folder import RunFolder

    study = demo / "study"
    for size in SIZES:
        blend = json.loads(RunFolder(study / "runs" / size / REPLAY).data_blend_path.read_text())
        assert blend["samples"] == 120 * 8, blend  # every sample of the budget
        legal, general = blend["sources"]
        assert legal["prefix"].endswith("/legal_train") and legal["weight"] == 0.75, blend
        assert general["prefix"].endswith("/general_train") and general["weight"] == 0.25, blend
        assert legal["samples"] + general["samples"] == blend["samples"]
        assert abs(general["samples"] - 0.25 * blend["samples"]) <= 1, blend

    results = _results(study)
    mix = results["mixture"]
    assert mix["general_loss_increase"] == 0.05 and list(mix["domains"]) == ["legal"], mix
    legal = mix["domains"]["legal"]
    cells = {f"{s}/{c}" for s in SIZES for c in ("general", "legal", REPLAY)}
    heldout = {}
    for name, f in legal["fits"].items():
        assert f["status"] == "ok" and f["form"] == "dcpt", (name, f)
        assert f["grid"] == {"points": 36, "cells": 9, "sizes": 3, "shares": 3,
                             "token_values": 4}, f["grid"]
        h = f["heldout"]
        assert set(h["per_cell"]) == cells and all(v is not None for v in h["per_cell"].values())
        assert 0 < h["rmse"] <= h["max_abs"] < 10, h
        heldout[name] = h["rmse"]
    rec = legal["recommendation"]
    assert rec["status"] == "ok" and list(rec["sizes"]) == list(SIZES), rec
    answers = {}
    for size, r in rec["sizes"].items():
        q = r["general_fraction"]
        if q["determinable"]:
            assert q["ci"][0] <= q["value"] <= q["ci"][1] and 0 <= q["value"] <= 1, q
            answers[size] = q["value"]
        else:
            assert q["note"] == NOT_DETERMINABLE and q["ci"] is None, q
            answers[size] = NOT_DETERMINABLE

    md = (study / "report" / "report.md").read_text()
    section = md[md.index("## Mixture law and replay recommendation"):md.index("## Cells")]
    assert section.count("**held-out cell** (leave-one-cell-out) RMSE") == 2, section
    for name, v in heldout.items():
        assert f"{name.replace('_', ' ')}: form `dcpt`" in section
        assert f"RMSE {v:.3g}, max |error|" in section, (name, v)
    for size in SIZES:
        row = next(line for line in section.splitlines() if line.startswith(f"| legal | {size} |"))
        fraction = row.split(" | ")[2]
        assert (NOT_DETERMINABLE in fraction) if answers[size] == NOT_DETERMINABLE \
            else (f"{answers[size]:.1%} [" in fraction), (row, answers[size])
    findings = md[md.index("## Findings"):md.index("## Plots")]
    assert "Replay (legal): to keep general validation loss within +0.05" in findings
    # a general-loss law that misses held-out cells by more than the budget says so
    assert rec["general_loss_heldout_rmse"] == heldout["general_loss"]
    assert rec["resolved"] == (heldout["general_loss"] <= 0.05)
    assert ("Caveat (legal): the general-loss law misses a held-out cell" in section) \
        == ("Caveat: the general-loss law misses" in findings) == (not rec["resolved"])
    out = (demo.parent / "demo_stdout.txt").read_text()
    assert "legal domain loss: dcpt on 36 points from 9 cells: L = " in out
    assert f"held-out cell (leave-one-cell-out) RMSE {heldout['domain_loss']:.3g}" in out
    print(f"mixture law (legal): held-out cell RMSE {heldout}; general fraction per size "
          f"{answers}")


def test_demo_grid_reruns_to_identical_results(demo, tmp_path):
    """Reproducible numbers: two cells of the grid retrained and re-evaluated from the same
    data and base models, on the local executor this time (the first run used SLURM), give a
    results.json identical to the first run's."""
    study = tmp_path / "study"
    shutil.copytree(demo / "study", study, ignore=shutil.ignore_patterns("report", "submitit"))
    for cell in ("general", "legal"):
        shutil.rmtree(study / "runs" / "tiny-a" / cell)
    env = {**_env(), "MCPT_STUDY_DIR": str(study), "MCPT_DATA_ROOT": str(demo / "data"),
           "MCPT_CKPT_ROOT": str(demo / "checkpoints")}
    proc = subprocess.run([sys.executable, "-m", "megatron_cpt", "launch", "grid", "--study",
                           str(REPO / "configs" / "study-demo.yaml"), "--sizes", "tiny-a",
                           "--domains", "general", "legal", "--executor", "local"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-m", "megatron_cpt", "report", "--study", str(study),
                           "--bootstrap", "200"], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first, second = _results(demo / "study"), _results(study)
    first.pop("study_dir"), second.pop("study_dir")
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)


def test_demo_grid_tracked_in_one_mlflow_experiment(demo, monkeypatch):
    """`demo --mlflow` (issue 28): every cell of the grid, run by SLURM, is one run of one MLflow
    experiment named after the study, tagged with its size, cell, kind and domain; each
    iteration's loss is logged once and equals metrics.jsonl; `eval run` put every scored
    checkpoint's scores on the same run at that checkpoint's step; the report is one more run."""
    from mlflow.tracking import MlflowClient

    from megatron_cpt.training.tracking import eval_values

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the demo's local store, read back
    client = MlflowClient(tracking_uri=f"file://{demo / 'mlruns'}")
    assert [e.name for e in client.search_experiments() if e.name != "Default"] == ["demo"]
    runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id],
                              max_results=1000)
    report = [r for r in runs if r.data.tags.get("kind") == "report"]
    cells = {(r.data.tags["size"], r.data.tags["cell"]): r for r in runs if r not in report}
    run_dirs = sorted(p.parent for p in (demo / "study" / "runs").glob("*/*/run.json"))
    assert len(report) == 1 and len(cells) == len(runs) - 1 == len(run_dirs), \
        sorted(cells)
    for run_dir in run_dirs:
        tracked = cells[(run_dir.parent.name, run_dir.name)]
        tags = tracked.data.tags
        assert tags["study"] == "demo" and tracked.info.status == "FINISHED", tags
        assert tags["kind"] in ("general", "domain", "control", "replay"), tags
        mid = tracked.info.run_id
        losses = {r["iteration"]: r["loss"] for r in map(json.loads, (
            run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"}
        hist = client.get_metric_history(mid, "train/loss")
        assert sorted(m.step for m in hist) == sorted(losses), run_dir  # each step once
        assert {m.step: m.value for m in hist} == losses, run_dir
        scored = [json.loads(p.read_text()) for p in sorted((run_dir / "eval").glob("*.json"))]
        assert scored, f"no eval result in {run_dir}"
        key = sorted(eval_values(scored[0]))[0]
        want = {int(s["iteration"]): eval_values(s)[key] for s in scored if key in eval_values(s)}
        got = {m.step: m.value for m in client.get_metric_history(mid, key)}
        assert got == want, (run_dir, key)
    print(f"MLflow: {len(cells)} cell runs + 1 report run in experiment 'demo'")
