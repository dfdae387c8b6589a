"""The native lm-eval backend equals lm-eval's own hf backend on the exported checkpoint, in
both exam formulations (MCF: the answer letters; CF: the choice texts as continuations)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_cli

TASKS = ["mcpt_legal_val", "mcpt_medical_test", "mcpt_legal_cf_val", "mcpt_medical_cf_test"]
LIMIT = 8


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tasks")
    run_cli("eval", "tasks", "--exams", str(REPO / "eval/exams/legal.jsonl"),
            str(REPO / "eval/exams/medical.jsonl"), "--out", str(out), "--num-fewshot", "3")
    assert (out / "mcpt_legal_val.yaml").is_file() and (out / "utils.py").is_file()
    assert (out / "mcpt_legal_cf_val.yaml").is_file()
    return out


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory, tiny_ckpt, tasks_dir) -> dict:
    """lm-eval's stock hf backend on the exported checkpoint: {task: {id: logliks}}."""
    tmp = tmp_path_factory.mktemp("hf_ref")
    export = tmp / "export"
    run_cli("convert", "mcore-to-hf", "--ckpt", str(tiny_ckpt["untied_kv2"]), "--out", str(export))
    cmd = [str(Path(sys.executable).parent / "lm_eval"), "--model", "hf", "--model_args",
           f"pretrained={export},dtype=float32", "--tasks", ",".join(TASKS), "--include_path",
           str(tasks_dir), "--limit", str(LIMIT), "--batch_size", "8", "--log_samples",
           "--output_path", str(tmp / "out")]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ref = {}
    for task in TASKS:
        (samples,) = list((tmp / "out").rglob(f"samples_{task}_*.jsonl"))
        ref[task] = {}
        for line in samples.read_text().splitlines():
            s = json.loads(line)
            ref[task][s["doc"]["id"]] = [float(r[0][0]) for r in s["resps"]]
    (results,) = list((tmp / "out").rglob("results_*.json"))
    ref["metrics"] = json.loads(results.read_text())["results"]
    return ref


@pytest.mark.parametrize("tp", [1, 2])
def test_native_backend_matches_hf_backend(tmp_path, tiny_ckpt, tasks_dir, hf_reference, tp):
    out = tmp_path / "native.json"
    run_cli("eval", "score", "--ckpt", str(tiny_ckpt["untied_kv2"]), "--tasks-dir", str(tasks_dir),
            "--tasks", ",".join(TASKS), "--tp", str(tp), "--limit", str(LIMIT), "--batch-size", "5",
            "--out", str(out), nproc=tp)
    native = json.loads(out.read_text())
    worst = 0.0
    for task in TASKS:
        records = native["samples"][task]
        assert len(records) == LIMIT
        for rec in records:
            ref = hf_reference[task][rec["id"]]
            assert len(ref) == len(rec["logliks"]) == 4
            worst = max(worst, max(abs(a - b) for a, b in zip(ref, rec["logliks"])))
        m, r = native["metrics"][task], hf_reference["metrics"][task]
        assert m["acc"] == r["acc,none"] and m["acc_norm"] == r["acc_norm,none"]
        assert m["answer_ppl"] == pytest.approx(r["answer_ppl,none"], rel=1e-4)
        if "_cf_" in task:  # per-token scores from the backend's own continuation lengths
            assert all(len(rec["tokens"]) == 4 and min(rec["tokens"]) >= 1 for rec in records)
            assert 0.0 <= m["acc_norm_tok"] <= 1.0 and m["answer_ppl_tok"] > 1.0
    assert worst <= 1e-4, worst
    print(f"TP{tp}: max |loglik native - hf| = {worst:.2e}")


def test_cf_metrics_on_known_logliks():
    """CF: acc_norm divides by each choice text's characters; per-token scores by its tokens."""
    sys.path.insert(0, str(REPO / "eval"))
    import task_utils

    from eval.scoring import per_token_scores

    doc = {"answer": 1, "choices": ["no", "a much longer answer"]}
    per_doc = task_utils.process_results_cf(doc, [(-2.0, False), (-5.0, False)])
    assert per_doc == {"acc": 0.0, "acc_norm": 1.0, "answer_ppl": 5.0}
    recs = [{"answer": 1, "logliks": [-2.0, -5.0], "tokens": [1, 5]},
            {"answer": 0, "logliks": [-3.0, -4.0], "tokens": [1, 2]}]
    scores = per_token_scores(recs)
    assert scores["acc_norm_tok"] == 0.5  # -1.0/token beats -2.0; -3.0 loses to -2.0/token
    assert scores["answer_ppl_tok"] == pytest.approx(math.exp((5.0 + 3.0) / 6))


def test_task_metrics_on_known_logliks():
    """acc, acc_norm and answer_ppl of the generated tasks on three hand-made questions."""
    sys.path.insert(0, str(REPO / "eval"))
    import task_utils

    docs = [{"answer": 0, "letters": ["A", "B", "C"]}, {"answer": 1, "letters": ["A", "B", "C"]},
            {"answer": 2, "letters": ["A", "B", "C"]}]
    logliks = [[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5], [-4.0, -3.0, -0.25]]
    per_doc = [task_utils.process_results(d, [(ll, False) for ll in lls])
               for d, lls in zip(docs, logliks)]
    assert [p["acc"] for p in per_doc] == [1.0, 0.0, 1.0]
    assert [p["acc_norm"] for p in per_doc] == [1.0, 0.0, 1.0]
    ppl = task_utils.perplexity_of_mean_nll([p["answer_ppl"] for p in per_doc])
    assert ppl == pytest.approx(math.exp((1.0 + 1.5 + 0.25) / 3))
