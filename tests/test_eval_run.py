"""`eval run` over a tiny training run: base model + every checkpoint, resumable."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO, run_cli


def test_eval_run_scores_every_checkpoint_once(tmp_path_factory, toy):
    from megatron_cpt.training.toy import toy_overrides

    run = tmp_path_factory.mktemp("evalrun") / "run"
    train = [sys.executable, "-m", "megatron_cpt", "train", "--config",
             str(REPO / "configs/train/tiny-cpu.yaml"), *toy_overrides(toy, run),
             "budget.iterations=6", "checkpoint.every_tokens=1536", "checkpoint.keep_last=5"]
    proc = subprocess.run(train, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    exams = [str(REPO / "eval/exams/legal.jsonl"), str(REPO / "eval/exams/general.jsonl")]
    args = ["eval", "run", "--run-dir", str(run), "--exams", *exams, "--limit", "4",
            "--num-fewshot", "2", "--valid-sequences", "4"]
    first = run_cli(*args)
    assert "scored 3 checkpoint(s): [0, 3, 6]" in first.stdout, first.stdout
    results = {}
    for it in (0, 3, 6):
        rec = json.loads((run / "eval" / f"{it:07d}.json").read_text())
        assert rec["iteration"] == it
        # both formulations: MCF under the exam's name, CF under <exam>_cf
        assert set(rec["exams"]) == {"legal", "general", "legal_cf", "general_cf"}
        for name, exam in rec["exams"].items():
            assert set(exam) == {"val", "test"}
            for split in exam.values():
                assert split["n"] == 4 and 0.0 <= split["acc"] <= 1.0 and split["answer_ppl"] > 1.0
                if name.endswith("_cf"):
                    assert 0.0 <= split["acc_norm_tok"] <= 1.0 and split["answer_ppl_tok"] > 1.0
        assert set(rec["valid"]) == {"legal", "general"}
        questions = (run / "eval" / f"{it:07d}.questions.jsonl").read_text().splitlines()
        assert len(questions) == 32 and len(json.loads(questions[0])["logliks"]) == 4
        results[it] = rec
    assert results[0]["tokens"] == 0 and results[6]["tokens"] == 6 * 512
    assert results[6]["flops"] > results[3]["flops"] > 0
    # training lowered the validation loss of the training domain
    assert results[6]["valid"]["legal"]["loss"] < results[0]["valid"]["legal"]["loss"]
    second = run_cli(*args)
    assert "scored 0 checkpoint(s): none new" in second.stdout, second.stdout
