"""Multiple-choice metrics from per-choice log-likelihoods (pure Python + numpy).

Inputs, per question ``q``:

- ``logliks[q][i]``: log-likelihood (natural log, summed over the continuation's tokens) of
  choice ``i`` as the continuation of the prompt;
- ``answers[q]``: index of the correct choice;
- ``lengths[q][i]``: length of choice ``i``'s continuation text, for ``acc_norm``.

Definitions (see docs/exams.md):

- ``acc``       = mean over questions of [argmax_i loglik_i == answer]
- ``acc_norm``  = mean over questions of [argmax_i loglik_i / length_i == answer]
                  (lm-eval's acc_norm; lm-eval takes ``float(len(choice))`` of each choice
                  string, i.e. its character count, which is the byte count for ASCII text;
                  :func:`choice_length` reproduces it)
- ``answer_ppl`` = exp(mean over questions of -loglik_answer): the perplexity of the correct
                  answer (letter) under the prompt, the original study's metric. Lower is better.

Ties in argmax go to the lowest index, as with ``numpy.argmax`` in lm-eval.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def choice_length(text: str) -> float:
    """Length lm-eval divides by for acc_norm: ``float(len(choice))`` of the choice string."""
    return float(len(text))


def _check(logliks, answers, lengths=None):
    if len(logliks) == 0:
        raise ValueError("no questions to score")
    if len(answers) != len(logliks):
        raise ValueError(f"{len(logliks)} questions of log-likelihoods but {len(answers)} answers")
    if lengths is not None and len(lengths) != len(logliks):
        raise ValueError(f"{len(logliks)} questions of log-likelihoods but {len(lengths)} "
                         "questions of choice lengths")
    for q, (lls, ans) in enumerate(zip(logliks, answers)):
        if len(lls) < 2:
            raise ValueError(f"question {q}: need at least 2 choices, got {len(lls)}")
        if (isinstance(ans, bool) or not isinstance(ans, (int, np.integer))
                or not 0 <= ans < len(lls)):
            raise ValueError(f"question {q}: answer {ans!r} is not an index into "
                             f"{len(lls)} choices")
        if lengths is not None:
            if len(lengths[q]) != len(lls):
                raise ValueError(f"question {q}: {len(lls)} log-likelihoods but "
                                 f"{len(lengths[q])} choice lengths")
            if any(n <= 0 for n in lengths[q]):
                raise ValueError(f"question {q}: choice lengths must be positive, "
                                 f"got {list(lengths[q])}")


def predictions(logliks: Sequence[Sequence[float]]) -> list[int]:
    """argmax of the log-likelihoods, per question."""
    return [int(np.argmax(np.asarray(lls, dtype=np.float64))) for lls in logliks]


def predictions_norm(logliks: Sequence[Sequence[float]],
                     lengths: Sequence[Sequence[float]]) -> list[int]:
    """argmax of log-likelihood / continuation length, per question."""
    return [int(np.argmax(np.asarray(lls, dtype=np.float64) / np.asarray(ns, dtype=np.float64)))
            for lls, ns in zip(logliks, lengths)]


def acc(logliks: Sequence[Sequence[float]], answers: Sequence[int]) -> float:
    """Fraction of questions whose highest-log-likelihood choice is the correct one."""
    _check(logliks, answers)
    preds = predictions(logliks)
    return sum(p == a for p, a in zip(preds, answers)) / len(answers)


def acc_norm(logliks: Sequence[Sequence[float]], answers: Sequence[int],
             lengths: Sequence[Sequence[float]]) -> float:
    """Like :func:`acc`, but each choice's log-likelihood is divided by its length first."""
    _check(logliks, answers, lengths)
    preds = predictions_norm(logliks, lengths)
    return sum(p == a for p, a in zip(preds, answers)) / len(answers)


def answer_ppl(logliks: Sequence[Sequence[float]], answers: Sequence[int]) -> float:
    """exp(mean over questions of the negative log-likelihood of the correct choice)."""
    _check(logliks, answers)
    nll = [-float(lls[a]) for lls, a in zip(logliks, answers)]
    return math.exp(math.fsum(nll) / len(nll))


def score(logliks: Sequence[Sequence[float]], answers: Sequence[int],
          lengths: Sequence[Sequence[float]]) -> dict:
    """All three metrics and the question count, as written to the eval results."""
    _check(logliks, answers, lengths)
    return {
        "acc": acc(logliks, answers),
        "acc_norm": acc_norm(logliks, answers, lengths),
        "answer_ppl": answer_ppl(logliks, answers),
        "n": len(answers),
    }
