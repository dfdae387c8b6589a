"""Per-document scoring for the generated lm-eval tasks (copied next to the task YAMLs as
``utils.py`` and referenced with ``!function utils.*``; keep it free of project imports).

lm-eval hands ``process_results`` one ``(loglikelihood, is_greedy)`` pair per choice; the
continuation of choice i is ``" " + letter_i``. Metrics:

- ``acc``: the highest-likelihood letter is the answer;
- ``acc_norm``: the same after dividing by the choice's character length (lm-eval's definition;
  equal to ``acc`` for single-letter choices);
- ``answer_ppl``: exp of the mean negative log-likelihood of the correct letter over the
  questions (the metric of arXiv 2501.02068); lower is better.
"""
import math


def process_results(doc, results):
    lls = [float(r[0]) for r in results]
    gold = int(doc["answer"])
    lengths = [float(len(c)) for c in doc["letters"]]
    best = max(range(len(lls)), key=lambda i: (lls[i], -i))
    best_norm = max(range(len(lls)), key=lambda i: (lls[i] / lengths[i], -i))
    return {"acc": float(best == gold), "acc_norm": float(best_norm == gold),
            "answer_ppl": -lls[gold]}


def perplexity_of_mean_nll(nlls):
    nlls = list(nlls)
    return math.exp(sum(nlls) / len(nlls))
