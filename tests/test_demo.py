"""The demo end to end on the real local SLURM cluster: data prep, base models, the grid
through `launch grid` (job arrays per size, evaluation chained afterok), `launch status`, and
the report, which must show the effect the study is about at toy scale: specialized runs reach
a lower domain validation loss than the general run at equal compute."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from conftest import REPO
from test_slurm import _job


def test_demo_grid_on_slurm_shows_the_effect(slurm_cluster, tmp_path):
    out = tmp_path / "demo"
    corpora = ["general", "legal", "control_legal"]  # 2 sizes x 3 cells (the full demo: 4)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "megatron_cpt", "demo", "--out", str(out),
                           "--executor", "slurm", "--domains", *corpora, "--bootstrap", "200"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=1800)
    seconds = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = out / "study"

    # the grid went through SLURM: one array per size, evaluation afterok on its element
    launches = json.loads((study / "launches.json").read_text())
    assert len(launches) == 6
    for size in ("tiny-a", "tiny-b"):
        arrays = {launches[f"{size}/{c}"]["train_job"].split("_")[0] for c in corpora}
        assert len(arrays) == 1, launches
    for entry in launches.values():
        job = _job(entry["eval_job"])
        assert job.get("JobState") == "COMPLETED", job
        assert f"afterok:{entry['train_job']}" in job.get("Dependency", "") or \
            job.get("Dependency") == "(null)", job  # SLURM clears a satisfied dependency

    # launch status: every cell done and evaluated
    status = subprocess.run(
        [sys.executable, "-m", "megatron_cpt", "launch", "status", "--study",
         str(REPO / "configs" / "study-demo.yaml"), "--json"], capture_output=True, text=True,
        cwd=REPO, env={**env, "MCPT_STUDY_DIR": str(study)}, check=True)
    rows = {r["cell"]: r for r in json.loads(status.stdout)}
    for size in ("tiny-a", "tiny-b"):
        for corpus in corpora:
            row = rows[f"{size}/{corpus}"]
            assert row["state"] in ("COMPLETED", "DONE"), row
            assert row["iteration"] == row["iterations"] == 40, row
            assert row["eval_state"] in ("COMPLETED", "5 scored"), row
        assert rows[f"{size}/medical"]["state"] == "NOT LAUNCHED"

    # the report shows the effect, and lists the cells the reduced grid left out
    results = json.loads((study / "report" / "results.json").read_text())
    for size in ("tiny-a", "tiny-b"):
        cell = results["cells"][f"{size}/legal"]
        effect = cell["domain_valid_loss_at_equal_compute"]
        assert len(effect["flops"]) == 4, effect
        assert effect["specialized_lower_everywhere"], effect
        assert all(s < g for s, g in zip(effect["specialized"], effect["general"])), effect
        assert cell["domain_valid_loss_vs_control"]["specialized_lower_everywhere"], cell
        assert cell["sger_domain_loss"]["value"] > 1.0, cell["sger_domain_loss"]
    assert results["summary"]["domain_valid_loss"]["all_cells_lower_everywhere"] is True
    assert any("medical" in str(m) for m in results["missing"]), results["missing"]
    md = (study / "report" / "report.md").read_text()
    assert "SGER" in md and "domain_loss_tiny-b.png" in md
    assert "data:image/png;base64" in (study / "report" / "report.html").read_text()
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["executor"] == "slurm"
    print(f"demo (6 cells) on the local SLURM cluster: {seconds:.0f} s; {summary['timings_s']}")
