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
    for bad, why in (([0.0, 0.25], "strictly between 0"), ({"fractions": [0.1],
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
