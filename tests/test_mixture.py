"""Replay cells, the mixture law and the replay recommendation (issue 27).

The replay cell's mix is checked on Megatron's own BlendedDataset built from the cell's
resolved training config over the toy prefixes (the index that fixes which sample every
step consumes). The fit and the recommendation are checked on losses generated from a known
law, so the true parameters and the true answer are known by construction.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO
from megatron_cpt.cli import main
from megatron_cpt.launch.study import StudyConfig


def _study_yaml(path: Path, **changes) -> Path:
    raw = yaml.safe_load((REPO / "configs" / "study.yaml").read_text())
    raw["train_config"] = str(REPO / "configs" / "train" / "study-base.yaml")
    raw["eval"]["exams"] = []
    raw.update(changes)
    path.write_text(yaml.safe_dump(raw))
    return path


# ------------------------------------------------------------------------- replay cells
def test_replay_cells_are_named_costed_and_blended(tmp_path, capsys):
    s = _study_yaml(tmp_path / "study.yaml", replay={"fractions": [0.25, 0.05],
                                                      "domains": ["legal"], "sizes": ["1.5b"]})
    study = StudyConfig.load(s, use_env=False)
    names = [c.name for c in study.cells()]
    assert "1.5b/legal_replay5" in names and "1.5b/legal_replay25" in names
    assert not any("replay" in n for n in names if not n.startswith("1.5b/"))  # sizes: [1.5b]
    cell = next(c for c in study.cells() if c.corpus == "legal_replay25")
    assert (cell.kind, cell.domain, cell.general_fraction) == ("replay", "legal", 0.25)
    from megatron_cpt.launch.sbatch import render, script_name
    assert script_name(cell) == "cpt_1.5b_legal_replay25.sh"
    text = render(cell)
    assert "$DATA_ROOT/legal_train, weight: 0.75}, {prefix: $DATA_ROOT/general_train, weight: 0.25}" \
        in text and "runs/1.5b/legal_replay25" in text
    assert main(["launch", "grid", "--study", str(s), "--dry-run", "--sizes", "1.5b"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("1.5b/legal_replay25"))
    assert "2.000e+10" in row and "GPU-h" in out
    # bad declarations: one line, exit 2
    for bad, why in (([0.0, 0.25], "replay.fractions must be in (0, 1), got 0"), ({"fractions": [0.1],
                     "domains": ["finance"]}, "not in domains"), ("lots", "list of general")):
        s2 = _study_yaml(tmp_path / "bad.yaml", replay=bad)
        capsys.readouterr()
        assert main(["plan", "--study", str(s2)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and why in err, err


def test_replay_cell_blend_draws_the_declared_general_fraction(tmp_path, toy):
    """The cell's resolved data.train, built as the trainer builds it: the general share of
    the samples the run consumes is the declared fraction to within one sample."""
    from megatron_cpt.training import data

    p = toy["prefixes"]
    droot = tmp_path / "data"
    droot.mkdir()
    for name in ("legal_train", "general_train"):
        for ext in (".bin", ".idx", ".manifest.json"):
            (droot / (name + ext)).symlink_to(p[name] + ext)
    s = _study_yaml(tmp_path / "study.yaml", data_root=str(droot),
                    replay={"fractions": [0.05, 0.25], "domains": ["legal"], "sizes": ["1.5b"]})
    study = StudyConfig.load(s, use_env=False)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        _check_blends(study, droot, tmp_path, toy)
    finally:
        dist.destroy_process_group()


def _check_blends(study, droot, tmp_path, toy):
    from megatron_cpt.training import data

    for corpus, r in (("legal_replay5", 0.05), ("legal_replay25", 0.25)):
        cell = next(c for c in study.cells(["1.5b"]) if c.corpus == corpus)
        cfg = cell.train_config()
        prefixes, weights = [t.prefix for t in cfg.data.train], [t.weight for t in cfg.data.train]
        assert prefixes == [str(droot / "legal_train"), str(droot / "general_train")]
        n = 1000  # samples the run consumes (every sample is one sequence: token share too)
        ds = data.build_train_dataset(prefixes, weights, n, 64, 1234, str(tmp_path / "cache"),
                                      toy["eod"], 1000)
        rec = data.blend_counts(ds, prefixes, weights, n)
        general = rec["sources"][1]
        assert abs(general["samples"] - r * n) <= 1, rec
        # every prefix of the order is within one sample of the ratio (Megatron's greedy index)
        idx = np.asarray(ds.dataset_index[:n])
        run = np.cumsum(idx == 1) - r * np.arange(1, n + 1)
        assert np.abs(run).max() <= 1.0, run


# ------------------------------------------------------------------------- the fit
from megatron_cpt.report.mixture import (NAMES, Observations, SizeQuery, _answer, choose_form,
                                         fit_law, law, recommend)

TRUE = dict(E=1.5, A=0.5, alpha=0.4, B=0.6, beta=0.3, eta=0.5, C=0.2, gamma=0.6, eps=0.05)


def _grid(sizes, shares, tokens, p=TRUE, noise=0.003, seed=1) -> Observations:
    rng = np.random.default_rng(seed)
    rows = [(n, d, r, f"{n}/{r}") for n in sizes for r in shares for d in tokens]
    n, d, r, c = zip(*rows)
    n, d, r = map(np.array, (n, d, r))
    return Observations(n, d, r, law(p, n, d, r) + rng.normal(0, noise, len(n)), list(c))


def test_fit_recovers_known_parameters_within_their_cis():
    obs = _grid((0.5, 1, 2, 4), (0, 0.25, 0.5, 0.75, 0.95, 1.0), (0.5, 1, 2, 4, 8))
    f = fit_law(obs, bootstrap=60, seed=0, n_scale=1.0, d_scale=1.0)
    assert f["status"] == "ok" and f["form"] == "dcpt", f
    for k in NAMES:
        lo, hi = f["ci"][k]
        assert lo <= TRUE[k] <= hi, (k, TRUE[k], f["params"][k], f["ci"][k])
    assert f["r2"] > 0.999
    # held-out cells are predicted to about the noise (0.003), never better than in-sample
    assert f["rmse"] <= f["heldout"]["rmse"] < 0.01, f["heldout"]
    assert len(f["heldout"]["per_cell"]) == 24


def test_too_small_grid_is_refused_and_a_middle_grid_gets_the_simpler_form():
    tiny = _grid((1, 2), (0, 1.0), (1, 2, 4))  # 2 sizes, 2 shares
    f = fit_law(tiny, bootstrap=5)
    assert f["status"] == "refused" and "grid too small" in f["reason"], f
    assert "2 sizes < 3" in f["reason"] and "2 shares < 3" in f["reason"]
    form, _ = choose_form(_grid((1, 2, 4), (0, 0.25, 1.0), (1, 2, 4)))  # 27 points, 9 cells
    assert form == "dcpt"
    form, why = choose_form(_grid((1, 2, 4), (0, 0.25, 1.0), (1, 2, 4))
                            .take(range(0, 27, 1)[:24]))  # 24 points < 27 for 9 parameters
    assert form == "dcpt_separable" and why == ""


# ------------------------------------------------------------------- the recommendation
GEN = dict(E=1.2, A=0.4, alpha=0.35, B=0.05, beta=0.3, eta=0.3, C=0.25, gamma=0.5, eps=0.05)
DOM = dict(E=1.6, A=0.6, alpha=0.3, B=0.5, beta=0.35, eta=0.4, C=0.15, gamma=0.7, eps=0.05)
SIZES = {"100m": 1e8, "400m": 4e8, "1.6b": 1.6e9}
TOKENS = (1e8, 2e8, 4e8, 8e8)
FRACTIONS = (0.0, 0.1, 0.3, 1.0)
NS, DS = 4e8, 2.83e8  # the scales the true laws are written in
WANT = 0.2            # the answer by construction at every size


def _base(params: float) -> float:
    """Base general loss chosen so that +0.05 is met exactly from g = WANT on."""
    return float(law(GEN, params / NS, TOKENS[-1] / DS, WANT)) - 0.05


def _synthetic_study(root: Path) -> Path:
    from test_report import write_run

    rng = np.random.default_rng(3)
    cells = []
    for size, n in SIZES.items():
        for g in FRACTIONS:
            cell = {0.0: "legal", 1.0: "general"}.get(g, f"legal_replay{round(g * 100)}")
            toks = (0.0,) + TOKENS
            gen = [_base(n)] + [float(law(GEN, n / NS, t / DS, g)) + rng.normal(0, 0.002)
                                for t in TOKENS]
            dom = [float(law(DOM, n / NS, 1e-9, 1.0))] + [  # base: any value (D = 0 not fitted)
                float(law(DOM, n / NS, t / DS, 1 - g)) + rng.normal(0, 0.002) for t in TOKENS]
            write_run(root / "runs" / size / cell, [t * 6e9 for t in toks], {},
                      {"general": gen, "legal": dom}, questions=False)
            kind = {"legal": "domain", "general": "general"}.get(cell, "replay")
            cells.append({"size": size, "cell": cell, "kind": kind, "general_fraction": g,
                          "domain": None if kind == "general" else "legal",
                          "run_dir": f"runs/{size}/{cell}"})
    (root / "study.json").write_text(json.dumps({
        "name": "mixture-synthetic", "cells": cells, "domains": ["legal"],
        "recommend": {"general_loss_increase": 0.05},
        "sizes": {s: {"params": n} for s, n in SIZES.items()}}))
    return root


def test_recommendation_on_a_synthetic_study_known_by_construction(tmp_path, capsys):
    for g in np.linspace(0, 1, 11):  # the construction: general loss falls with its share
        assert law(GEN, 1, 1, g + 0.05) < law(GEN, 1, 1, g)
    root = _synthetic_study(tmp_path / "study")
    assert main(["report", "--study", str(root), "--bootstrap", "40"]) == 0
    res = json.loads((root / "report" / "results.json").read_text())
    mix = res["mixture"]
    assert mix["general_loss_increase"] == 0.05 and "study" in mix["budget_source"]
    m = mix["domains"]["legal"]
    for f in m["fits"].values():
        assert f["status"] == "ok" and f["heldout"]["rmse"] < 0.02, f
    for size, n in SIZES.items():
        r = m["recommendation"]["sizes"][size]
        q = SizeQuery(size, n, TOKENS[-1], _base(n))
        g, dom, tok, target = _answer(GEN, DOM, q, NS, DS, 0.05, None)
        assert abs(g - WANT) <= 0.001  # the construction, through the true laws
        for key, truth in (("general_fraction", g), ("domain_loss", dom)):
            got = r[key]
            assert got["determinable"] and got["ci"][0] <= truth <= got["ci"][1], (size, key, got, truth)
            assert abs(got["value"] - truth) < (0.03 if key == "general_fraction" else 0.01)
        assert r["tokens_to_target"]["value"] is not None
    md = (root / "report" / "report.md").read_text()
    assert "## Mixture law and replay recommendation" in md and "held-out cell" in md
    assert "Replay (legal): to keep general validation loss within +0.05" in md
    # the general-loss law resolves the budget here (held-out error below 0.05): no caveat
    assert m["recommendation"]["resolved"] and "Caveat" not in md
    # a tighter budget on the command line moves the answer up
    out2 = tmp_path / "r2"
    assert main(["report", "--study", str(root), "--bootstrap", "10", "--out", str(out2),
                 "--forgetting-budget", "0.02"]) == 0
    tight = json.loads((out2 / "results.json").read_text())["mixture"]
    assert tight["budget_source"] == "command line"
    for size in SIZES:
        assert tight["domains"]["legal"]["recommendation"]["sizes"][size]["general_fraction"][
            "value"] > m["recommendation"]["sizes"][size]["general_fraction"]["value"]
    # plan --recommend prints the same table from the finished study folder
    from megatron_cpt.report.mixture_text import plain_table
    capsys.readouterr()
    assert main(["plan", "--recommend", "--study", str(root), "--bootstrap", "40"]) == 0
    printed = capsys.readouterr().out
    assert plain_table(mix) in printed
    assert "legal domain loss: dcpt on 48 points from 12 cells: L = " in printed
    assert f"held-out cell (leave-one-cell-out) RMSE {m['fits']['domain_loss']['heldout']['rmse']:.3g}" \
        in printed
    # the README's demo block (python -m megatron_cpt.report.readme) from the same results.json
    from megatron_cpt.report.readme import mixture_block
    block = mixture_block(res)
    assert "- legal general loss: dcpt on 48 points" in block and "| legal | 1.6b |" in block
    assert mixture_block({"mixture": {"domains": {}}}) is None


def test_unbounded_ci_is_not_determinable():
    """A general loss that never meets the budget in most replicates: no number, the words."""
    fit = {"status": "ok", "params": GEN, "n_scale": NS, "d_scale": DS,
           "replicates": np.array([[GEN[k] for k in NAMES]] * 5 + [[GEN[k] * (3 if k == "E" else 1)
                                                                    for k in NAMES]] * 5)}
    rec = recommend(fit, {**fit, "params": DOM, "replicates": np.array([[DOM[k] for k in NAMES]] * 10)},
                    [SizeQuery("1b", 1e9, TOKENS[-1], _base(1e9))], 0.05)
    q = rec["sizes"]["1b"]["general_fraction"]
    assert not q["determinable"] and q["note"] == "not determinable from this grid"
    assert not rec["sizes"]["1b"]["domain_loss"]["determinable"]
