"""``megatron-cpt report`` on synthetic studies with known curves (no models, no GPUs).

The expected numbers below are worked out by hand from the constructed curves, not copied
from the code's output.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from megatron_cpt.cli import main
from megatron_cpt.report import analyze, build_report
from megatron_cpt.report.analysis import (BASE_REACHES, GENERAL_NO_IMPROVEMENT, NOT_REACHED, OK,
                                          sger_arrays)
from megatron_cpt.report.load import Point, Run, Study, load_study

NQ = 20  # questions per exam split: accuracies are multiples of 0.05


# ----------------------------------------------------------------------------- generator
def _questions(acc: float, exam: str, split: str) -> list[dict]:
    """NQ questions of which round(acc * NQ) (the first ones) are answered correctly."""
    k = round(acc * NQ)
    recs = []
    for j in range(NQ):
        answer = 0 if j < k else 1  # logliks favour choice 0
        recs.append({"task": f"mcpt_{exam}_{split}", "id": f"{exam}-{split}-{j}",
                     "subject": exam, "answer": answer, "logliks": [-0.5, -1.0, -2.0, -3.0]})
    return recs


def write_run(run_dir: Path, flops, exams: dict, valid: dict, questions: bool = True) -> None:
    """One trainer run folder with eval/<iter>.json (+ questions.jsonl). ``exams``:
    {exam: {split: [acc per point]}}, ``valid``: {name: [loss per point]}."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text("model:\n  pretrained: ../../../base\ndata:\n  valid: []\n")
    (run_dir / "eval").mkdir(exist_ok=True)
    for i, f in enumerate(flops):
        it = i * 100
        rec = {"iteration": it, "tokens": f / 6e9, "flops": f, "checkpoint": f"iter_{it:07d}",
               "exams": {e: {s: {"acc": v[i], "acc_norm": v[i], "answer_ppl": 2.0 - v[i], "n": NQ}
                             for s, v in splits.items()} for e, splits in exams.items()},
               "valid": {n: {"loss": v[i], "ppl": math.exp(v[i]), "tokens": 1000}
                         for n, v in valid.items()}}
        (run_dir / "eval" / f"{it:07d}.json").write_text(json.dumps(rec))
        if questions:
            with (run_dir / "eval" / f"{it:07d}.questions.jsonl").open("w") as fh:
                for e, splits in exams.items():
                    for s, v in splits.items():
                        for q in _questions(v[i], e, s):
                            fh.write(json.dumps(q) + "\n")


def make_study(root: Path) -> Path:
    """Sizes 1b (general, legal, control_legal) and 4b (general, legal; control_legal folder
    without evaluations), 8b (legal scored at the base model only, no general cell);
    medical is declared but has no runs."""
    gen_acc = [0.25] * 4
    # --- 1b
    write_run(root / "runs/1b/general", [0, 1e15, 2e15, 4e15],
              {"legal": {"val": [0.3, 0.4, 0.5, 0.6], "test": [0.3, 0.4, 0.5, 0.55]},
               "general": {"val": gen_acc, "test": gen_acc}},
              {"general": [2.0, 1.9, 1.8, 1.7], "legal": [3.0, 2.9, 2.8, 2.7]})
    # val-best is iteration 200 (0.7, test 0.6); test-best is iteration 300 (test 0.8)
    write_run(root / "runs/1b/legal", [0, 0.5e15, 1.5e15, 3e15],
              {"legal": {"val": [0.3, 0.5, 0.7, 0.65], "test": [0.3, 0.5, 0.6, 0.8]},
               "general": {"val": gen_acc, "test": [0.25, 0.25, 0.2, 0.2]}},
              {"general": [2.0, 2.05, 2.1, 2.2], "legal": [3.0, 2.5, 2.3, 2.1]})
    write_run(root / "runs/1b/control_legal", [0, 1e15, 2e15, 4e15],
              {"legal": {"val": [0.3, 0.35, 0.45, 0.5], "test": [0.3, 0.35, 0.45, 0.5]},
               "general": {"val": gen_acc, "test": gen_acc}},
              {"general": [2.0, 1.95, 1.9, 1.85], "legal": [3.0, 2.95, 2.9, 2.85]})
    # --- 4b
    write_run(root / "runs/4b/general", [0, 2e15, 4e15, 8e15],
              {"legal": {"val": [0.4, 0.5, 0.6, 0.7], "test": [0.4, 0.5, 0.6, 0.7]}},
              {"general": [1.8, 1.7, 1.6, 1.5], "legal": [2.8, 2.7, 2.6, 2.5]})
    write_run(root / "runs/4b/legal", [0, 1e15, 2e15, 4e15],
              {"legal": {"val": [0.4, 0.7, 0.8, 0.8], "test": [0.4, 0.7, 0.75, 0.8]}},
              {"general": [1.8, 1.8, 1.85, 1.9], "legal": [2.8, 2.4, 2.2, 2.0]})
    (root / "runs/4b/control_legal").mkdir(parents=True)
    (root / "runs/4b/control_legal/config.yaml").write_text("model: {}\n")
    # --- 8b: only the base model scored, no general cell
    write_run(root / "runs/8b/legal", [0], {"legal": {"val": [0.5], "test": [0.5]}},
              {"general": [1.6], "legal": [2.6]})
    cells = [{"size": s, "cell": c, "run_dir": f"runs/{s}/{c}"}
             for s, cs in {"1b": ["general", "legal", "control_legal", "medical"],
                           "4b": ["general", "legal", "control_legal"],
                           "8b": ["legal"]}.items() for c in cs]
    (root / "study.json").write_text(json.dumps({
        "name": "synthetic", "cells": cells, "domains": ["legal", "medical"],
        "controls": ["legal"],
        "sizes": {"1b": {"params": 1e9}, "4b": {"params": 4e9}, "8b": {"params": 8e9}}}))
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = make_study(tmp_path_factory.mktemp("study"))
    out = root / "out"
    results = build_report(root, out, bootstrap=200, seed=0)
    return root, out, results


# ----------------------------------------------------------------------------- selection
def test_best_checkpoint_uses_val_not_test(report):
    _, _, r = report
    best = r["cells"]["1b/legal"]["best"]["specialized"]
    assert best["iteration"] == 200  # val 0.7; the test-best (0.8) is iteration 300
    assert best["val_acc"] == pytest.approx(0.7)
    assert best["test_acc"] == pytest.approx(0.6)
    assert best["flops"] == pytest.approx(1.5e15)
    assert r["cells"]["1b/legal"]["base"]["test_acc"] == pytest.approx(0.3)
    # ties on val (0.8 at 2e15 and 4e15) go to the least compute
    assert r["cells"]["4b/legal"]["best"]["specialized"]["flops"] == pytest.approx(2e15)
    assert r["cells"]["4b/legal"]["compute_to_best"]["general"]["flops"] == pytest.approx(8e15)


# ----------------------------------------------------------------------------- SGER
def test_sger_hand_computed(report):
    _, _, r = report
    s = r["cells"]["1b/legal"]["sger"]
    # general best val 0.6 at 4e15; specialized 0.5 @ 0.5e15 -> 0.7 @ 1.5e15: 0.6 at 1e15
    assert s["flag"] == "ok"
    assert s["target_val_acc"] == pytest.approx(0.6)
    assert s["reference_flops"] == pytest.approx(4e15)
    assert s["specialized_flops"] == pytest.approx(1e15)
    assert s["value"] == pytest.approx(4.0)
    # control best 0.5 at 4e15; specialized reaches 0.5 at its checkpoint 0.5e15 -> 8
    assert r["cells"]["1b/legal"]["sger_control"]["value"] == pytest.approx(8.0)
    # 4b: general 0.7 at 8e15; specialized reaches 0.7 at 1e15 -> 8
    assert r["cells"]["4b/legal"]["sger"]["value"] == pytest.approx(8.0)


def test_sger_edge_cases():
    f = np.array([0.0, 1.0, 2.0])
    # specialized never reaches 0.6: bound = 2 / 2 (general compute / spec total compute)
    r = sger_arrays(f, np.array([0.3, 0.5, 0.6]), f, np.array([0.3, 0.4, 0.5]))
    assert r["flag"] == NOT_REACHED and np.isnan(r["value"]) and r["bound"] == pytest.approx(1.0)
    # general never improves over the base model
    r = sger_arrays(f, np.array([0.5, 0.4, 0.5]), f, np.array([0.5, 0.6, 0.7]))
    assert r["flag"] == GENERAL_NO_IMPROVEMENT and np.isnan(r["value"])
    # the specialized run's first point (compute 0) already reaches the target
    r = sger_arrays(f, np.array([0.3, 0.4, 0.5]), f, np.array([0.5, 0.6, 0.7]))
    assert r["flag"] == BASE_REACHES and np.isnan(r["value"])
    # interpolation: 0.45 lies 3/4 of the way from 0.3 @ 1 to 0.5 @ 2 -> 1.75; SGER 2/1.75
    r = sger_arrays(f, np.array([0.3, 0.4, 0.45]), np.array([0.0, 1.0, 2.0]),
                    np.array([0.2, 0.3, 0.5]))
    assert r["flag"] == OK and r["c_spec"] == pytest.approx(1.75)
    assert r["value"] == pytest.approx(2 / 1.75)


# ----------------------------------------------------------------------------- forgetting
def test_forgetting_and_domain_loss_at_equal_compute(report):
    _, _, r = report
    c = r["cells"]["1b/legal"]
    gl = c["forgetting_at_equal_compute"]["general_valid_loss"]
    assert gl["flops"] == pytest.approx([0.5e15, 1.5e15, 3e15])
    assert gl["reference"] == pytest.approx([1.95, 1.85, 1.75])
    assert gl["delta"] == pytest.approx([0.1, 0.25, 0.45])
    ga = c["forgetting_at_equal_compute"]["general_exam_test_acc"]
    assert ga["delta"] == pytest.approx([0.0, -0.05, -0.05])
    dl = c["domain_valid_loss_at_equal_compute"]
    assert dl["general"] == pytest.approx([2.95, 2.85, 2.75])
    assert dl["specialized"] == pytest.approx([2.5, 2.3, 2.1])
    assert dl["specialized_lower_everywhere"] is True
    assert r["summary"]["domain_valid_loss"] == {
        "cells_compared": 2, "specialized_lower_everywhere": 2,
        "all_cells_lower_everywhere": True}


def test_findings_state_forgetting_in_words(report):
    """The report opens with the findings; forgetting is one sentence there, from the same
    equal-compute numbers as above (1b: 2.2 - 1.75 = +0.45 at 3e15; 4b: 1.9 - 1.6 = +0.30 at
    4e15; the general exam only in 1b: -0.05)."""
    _, out, _ = report
    md = (out / "report.md").read_text()
    assert md.index("## Findings") < md.index("## Plots")
    findings = md[md.index("## Findings"):md.index("## Plots")]
    assert ("general validation loss +0.300 to +0.450, higher in 2 of 2 cells; general exam "
            "test accuracy -0.050 to -0.050.") in findings, findings


def test_fit_two_sizes_and_bootstrap_ci(report):
    _, _, r = report
    f = r["fits"]["legal"]["sger"]
    # SGER 4 at 1e9 and 8 at 4e9: b = log 2 / log 4 = 0.5, a = 4 / 1e9 ** 0.5
    assert f["sizes_used"] == 2
    assert f["b"] == pytest.approx(0.5)
    assert f["a"] == pytest.approx(4 / 1e9 ** 0.5)
    assert f["b_ci"][0] <= f["b_ci"][1]
    ci = r["cells"]["1b/legal"]["bootstrap"]["sger"]["ci"]
    assert ci[0] <= 4.0 <= ci[1]


# ----------------------------------------------------------------------------- robustness
def test_missing_cells_reported_not_fatal(report):
    _, _, r = report
    missing = "\n".join(r["missing"])
    assert "1b/medical: run folder" in missing
    assert "4b/control_legal: no evaluations" in missing
    assert "8b/legal: only the base model" in missing
    assert "8b/general: cell not in the study" in missing
    assert "4b/medical: cell not in the study" in missing
    assert r["cells"]["8b/legal"]["sger"] is None
    assert "general" in r["cells"]["8b/legal"]["missing"]
    assert r["cells"]["1b/medical"]["missing"] == ["specialized"]


def test_discovery_without_study_json(report, tmp_path):
    root, _, _ = report
    import shutil

    shutil.copytree(root / "runs", tmp_path / "runs")
    study = load_study(tmp_path)
    assert set(study.sizes) == {"1b", "4b", "8b"} and study.domains == ["legal"]
    assert all(v is None for v in study.sizes.values())  # no readable base checkpoint
    r = analyze(study, bootstrap=0)
    assert r["fits"] == {} and any("no fits" in n for n in r["notes"])
    assert r["cells"]["1b/legal"]["sger"]["value"] == pytest.approx(4.0)
    assert any(m.startswith("8b/general") for m in r["missing"])


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main(["report", "--study", str(tmp_path / "nope")]) == 2
    (tmp_path / "empty" / "runs").mkdir(parents=True)
    assert main(["report", "--study", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("megatron-cpt report: error:") for e in err)


def test_cli_end_to_end(report, tmp_path, capsys):
    root, _, _ = report
    out = tmp_path / "rep"
    assert main(["report", "--study", str(root), "--out", str(out), "--bootstrap", "50"]) == 0
    stdout = capsys.readouterr().out
    assert str(out / "report.md") in stdout and "| 1b | legal |" in stdout
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html
    results = json.loads((out / "results.json").read_text())
    assert results["bootstrap"]["replicates"] == 50
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"sger_vs_size.png", "score_vs_compute_1b.png", "forgetting_1b.png",
            "domain_loss_1b.png"} <= set(pngs)
    assert set(results["plots"]) == set(pngs)
    md = (out / "report.md").read_text()
    assert "## Missing" in md and "4b/control_legal" in md


# ----------------------------------------------------------------------------- coverage
def _bernoulli_study(rng, nq: int) -> tuple[Study, float]:
    """Two sizes whose expected SGER follows SGER = a * N^b with b = -0.5: per-question
    correctness ~ Bernoulli(p) with p the curves below, independently per run and point."""
    def run(size, cell, flops, p):
        correct = (rng.random((len(p), nq)) < np.array(p)[:, None]).astype(float)
        pts = [Point(i * 100, f, f, {"legal": {"val": {"acc": float(correct[i].mean())}}}, {})
               for i, f in enumerate(flops)]
        kind = "general" if cell == "general" else "domain"
        r = Run(size, cell, kind, None if kind == "general" else "legal", Path(size), None, pts)
        r.correct["mcpt_legal_val"] = correct
        return r

    runs = {}
    # general best (0.6) at 4e15 in both sizes; specialized reaches 0.6 at 1e15 (1b) and
    # 2e15 (4b): true SGER 4 and 2, so b = log(2/4) / log(4) = -0.5
    for size, sf in (("1b", [0, 0.5e15, 1.5e15]), ("4b", [0, 1e15, 3e15])):
        runs[f"{size}/general"] = run(size, "general", [0, 2e15, 4e15], [0.3, 0.45, 0.6])
        runs[f"{size}/legal"] = run(size, "legal", sf, [0.3, 0.5, 0.7])
    ids = [str(j) for j in range(nq)]
    study = Study("cov", Path("."), runs, {"1b": 1e9, "4b": 4e9}, ["legal"],
                  question_ids={"mcpt_legal_val": ids})
    return study, -0.5


def test_bootstrap_ci_coverage_of_true_exponent():
    covered = 0
    for seed in range(100):
        study, true_b = _bernoulli_study(np.random.default_rng(1000 + seed), nq=1000)
        fit = analyze(study, bootstrap=200, seed=seed)["fits"]["legal"]["sger"]
        lo, hi = fit["b_ci"]
        covered += lo <= true_b <= hi
    assert covered >= 90, covered


def test_sger_on_domain_validation_loss_hand_computed(report):
    """SGER on valid.legal.loss (lower is better): 1b general's lowest legal loss 2.7 at 4e15;
    the legal run crosses 2.7 between 3.0 @ 0 and 2.5 @ 0.5e15 -> 0.3e15 -> 13.33. Control
    (2.85 @ 4e15) is crossed at 0.15e15 -> 26.67. 4b: 2.5 @ 8e15 vs 2.8 @ 0 .. 2.4 @ 1e15 ->
    0.75e15 -> 10.67; power law over 1b, 4b: b = ln(0.8)/ln(4)."""
    _, _, r = report
    c1, c4 = r["cells"]["1b/legal"], r["cells"]["4b/legal"]
    assert c1["sger_domain_loss"]["flag"] == "ok"
    assert c1["sger_domain_loss"]["target_valid_loss"] == pytest.approx(2.7)
    assert c1["sger_domain_loss"]["specialized_flops"] == pytest.approx(0.3e15)
    assert c1["sger_domain_loss"]["value"] == pytest.approx(40 / 3)
    assert c1["sger_domain_loss_control"]["value"] == pytest.approx(80 / 3)
    assert c4["sger_domain_loss"]["value"] == pytest.approx(8 / 0.75)
    fit = r["fits"]["legal"]["sger_domain_loss"]
    assert fit["b"] == pytest.approx(math.log(0.8) / math.log(4))
    assert fit["a_ci"] is None and "not resampled" in fit["ci_note"]


def test_sizes_order_by_parameters_else_by_name():
    from megatron_cpt.report.load import size_key

    names = ["14b", "tiny-a", "1.5b", "500m", "7b"]
    assert sorted(names, key=lambda s: size_key(s, None)) == ["500m", "1.5b", "7b", "14b", "tiny-a"]
    assert size_key("tiny-a", 6e5) < size_key("tiny-b", 9e5) < size_key("1.5b", None)


def test_readme_blocks_written_from_results(report, tmp_path):
    """The README's demo picture and table come from one run's results.json, by a script:
    the blocks between the markers are replaced, the text around them kept, the plot copied."""
    import shutil

    from megatron_cpt.report.readme import main as readme_main

    _, out, results = report
    demo = tmp_path / "demo_out"
    (demo / "study").mkdir(parents=True)
    shutil.copytree(out, demo / "study" / "report")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- demo:picture -->\nold\n<!-- /demo:picture -->\nmiddle\n"
                      "<!-- demo:table -->\nold\n<!-- /demo:table -->\nend\n")
    size = list(results["sizes"])[-1]  # the largest size's score plot becomes the picture
    assert (demo / "study" / "report" / f"score_vs_compute_{size}.png").is_file()
    assert readme_main([str(demo), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and "\nmiddle\n" in text and text.endswith("end\n")
    assert "old" not in text
    assert "| 1b | legal |" in text  # the summary table's row for the synthetic 1b/legal cell
    assert (tmp_path / "docs" / "img" / "demo_exam.png").is_file()
    readme.write_text("no markers\n")
    with pytest.raises(Exception, match="demo:picture"):
        readme_main([str(demo), "--readme", str(readme)])
