"""Score one checkpoint on lm-eval tasks with the native backend; keep per-question records."""
from __future__ import annotations

import json
import math
from pathlib import Path


def task_manager(tasks_dir: Path, tasks: list[str]):
    """lm-eval's TaskManager for our exam tasks. Indexing lm-eval's own task catalogue takes
    ~10 s per call, so it is only included when a task outside ours (``mcpt_*``) is asked for."""
    from lm_eval.tasks import TaskManager

    stock = any(not t.startswith("mcpt_") for t in tasks)
    return TaskManager(include_path=str(tasks_dir), include_defaults=stock)


def evaluate_checkpoint(ckpt: Path, tasks_dir: Path, tasks: list[str], tp: int = 1, pp: int = 1,
                        batch_size: int = 16, limit: int | None = None,
                        keep_model: bool = False, manager=None) -> dict | None:
    """Collective over TP*PP ranks. Returns ``{"metrics": {task: {...}}, "samples": {task:
    [per-question records]}}`` on global rank 0 (lm-eval reports on one process), else None.
    With ``keep_model``: ``{"model", "model_cfg", "summary"}`` on every rank, to reuse the
    loaded model (e.g. for validation perplexity)."""
    import lm_eval

    from eval.native import MegatronCPTLM

    lm = MegatronCPTLM(str(ckpt), tp=tp, pp=pp, batch_size=batch_size)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager or task_manager(tasks_dir, tasks),
        limit=limit, log_samples=True, bootstrap_iters=0, verbosity="WARNING")
    summary = summarize(out, lm.continuation_tokens) if out is not None else None
    if keep_model:
        return {"model": lm.model, "model_cfg": lm.model_cfg, "summary": summary}
    return summary


def summarize(out: dict, continuation_tokens: dict | None = None) -> dict:
    """lm-eval's result dict -> our metrics and per-question records. With the backend's
    ``continuation_tokens`` the CF tasks also get per-token scores: ``acc_norm_tok`` (argmax
    of log-likelihood per continuation token) and ``answer_ppl_tok`` (per-token perplexity of
    the correct answers)."""
    metrics, samples = {}, {}
    for task, values in out["results"].items():
        metrics[task] = {m.split(",")[0]: v for m, v in values.items()
                         if m.split(",")[0] in ("acc", "acc_norm", "answer_ppl")}
        recs = []
        for s in out["samples"].get(task, []):
            lls = [float(r[0]) for r in (x[0] if isinstance(x[0], (list, tuple)) else x
                                         for x in s["filtered_resps"])]
            rec = {"id": s["doc"]["id"], "subject": s["doc"].get("subject"),
                   "answer": int(s["doc"]["answer"]), "logliks": lls}
            if "_cf_" in task:  # lengths for acc_norm (chars) and per-token scores
                rec["chars"] = [len(c) for c in s["doc"]["choices"]]
                if continuation_tokens is not None:
                    rec["tokens"] = [continuation_tokens.get(tuple(a)) for a in s["arguments"]]
            recs.append(rec)
        samples[task] = recs
        metrics[task]["n"] = len(recs)
        if recs and all(r.get("tokens") and None not in r["tokens"] for r in recs):
            metrics[task].update(per_token_scores(recs))
    return {"metrics": metrics, "samples": samples}


def per_token_scores(recs: list[dict]) -> dict:
    """OLMES's per-token normalisation of CF records (``logliks`` and ``tokens`` per choice)."""
    hits, nll, toks = 0, 0.0, 0
    for r in recs:
        norm = [ll / t for ll, t in zip(r["logliks"], r["tokens"])]
        hits += int(max(range(len(norm)), key=lambda i: (norm[i], -i)) == r["answer"])
        nll, toks = nll - r["logliks"][r["answer"]], toks + r["tokens"][r["answer"]]
    return {"acc_norm_tok": hits / len(recs), "answer_ppl_tok": math.exp(nll / toks)}


def write_json(path: Path, data: dict) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=True))
    tmp.replace(path)


def finite(x: float) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None
