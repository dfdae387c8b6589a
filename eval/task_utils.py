"""Per-document scoring for the generated lm-eval tasks (copied next to the task YAMLs as
``utils.py`` and referenced with ``!function utils.*``; keep it free of project imports).

lm-eval hands ``process_results`` one ``(loglikelihood, is_greedy)`` pair per choice; the
continuation of choice i is ``" " + letter_i`` (MCF, ``process_results``) or ``" " + the text
of choice i`` (CF, ``process_results_cf``). Metrics:

- ``acc``: the highest-likelihood continuation is the answer;
- ``acc_norm``: the same after dividing by the choice's character length (lm-eval's definition;
  equal to ``acc`` for single-letter choices; OLMES's per-character normalisation for CF);
- ``answer_ppl``: exp of the mean negative log-likelihood of the correct continuation over the
  questions (MCF: the answer letter, the metric of arXiv 2501.02068; CF: the whole answer
  text); lower is better.
Per-token normalisation needs token counts, which lm-eval does not pass here: the native
backend adds it (eval/scoring.py).
"""
import math


def process_results(doc, results):
    return _scores(doc, results, doc["letters"])


def process_results_cf(doc, results):
    return _scores(doc, results, doc["choices"])


def _scores(doc, results, continuations):
    lls = [float(r[0]) for r in results]
    gold = int(doc["answer"])
    lengths = [float(len(c)) for c in continuations]
    best = max(range(len(lls)), key=lambda i: (lls[i], -i))
    best_norm = max(range(len(lls)), key=lambda i: (lls[i] / lengths[i], -i))
    return {"acc": float(best == gold), "acc_norm": float(best_norm == gold),
            "answer_ppl": -lls[gold]}


def perplexity_of_mean_nll(nlls):
    nlls = list(nlls)
    return math.exp(sum(nlls) / len(nlls))
