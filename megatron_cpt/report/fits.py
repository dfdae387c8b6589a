"""Power laws across model sizes and bootstrap confidence intervals over exam questions.

Why resample questions: the exam is a finite sample of questions, and every number the
report selects (best checkpoint, compute to reach a score, SGER) is a function of per-question
correctness. One bootstrap replicate draws each exam split's questions with replacement
*once* and applies that draw to every checkpoint of every run (the runs answered the same
questions), then recomputes accuracies -> best selection -> SGER / compute-to-best -> fits.
Replicates are vectorized: a replicate's accuracy of every point is a weighted mean with the
question multiplicities as weights, i.e. one matrix product per run.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_cpt.report.analysis import NOT_REACHED, best_index, sger_arrays
from megatron_cpt.report.load import CONTROL_PREFIX, GENERAL, Study

LEVEL = (2.5, 97.5)
MIN_VALID = 0.5  # a CI needs at least this fraction of replicates with a defined value


def power_law(n: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least squares of log y = log a + b log n. ``y`` is ``[..., S]`` over sizes ``n`` ``[S]``;
    returns (a, b) of shape ``[...]``; NaN where any y is not finite and positive."""
    n = np.asarray(n, float)
    y = np.asarray(y, float)
    x = np.stack([np.ones_like(n), np.log(n)], axis=1)  # [S, 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        ly = np.where((y > 0) & np.isfinite(y), np.log(np.where(y > 0, y, 1.0)), np.nan)
    coef = ly @ np.linalg.pinv(x).T  # [..., 2]; NaN propagates through the product
    return np.exp(coef[..., 0]), coef[..., 1]


def percentile_ci(samples: np.ndarray) -> tuple[list[float] | None, float]:
    """2.5/97.5 percentiles over the finite replicates; None when fewer than MIN_VALID of
    them are finite. Returns (ci, fraction of finite replicates)."""
    s = np.asarray(samples, float)
    ok = np.isfinite(s)
    frac = float(ok.mean()) if s.size else 0.0
    if not s.size or frac < MIN_VALID:
        return None, frac
    return [float(v) for v in np.percentile(s[ok], LEVEL)], frac


def question_weights(study: Study, b: int, seed: int) -> dict[str, np.ndarray]:
    """Per task, ``[b, n_questions]`` multiplicities of one with-replacement draw per replicate."""
    rng = np.random.default_rng(seed)
    out = {}
    for task, ids in sorted(study.question_ids.items()):
        n = len(ids)
        out[task] = rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(float)
    return out


def replicate_acc(correct: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Accuracy of every point under every replicate: ``[b, n_points]``; NaN where a point
    has no (resampled) question scored."""
    m = np.isfinite(correct).astype(float)
    c = np.nan_to_num(correct)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w @ c.T) / (w @ m.T)


@dataclass
class CellReplicates:
    """Bootstrap replicates of one size x domain (NaN where undefined in a replicate)."""

    sger: np.ndarray | None = None
    sger_flag: np.ndarray | None = None
    sger_control: np.ndarray | None = None
    compute_to_best: dict[str, np.ndarray] | None = None


def _val_task(domain: str) -> str:
    return f"mcpt_{domain}_val"


def cell_replicates(study: Study, size: str, domain: str,
                    weights: dict[str, np.ndarray], exam: str | None = None) -> CellReplicates | None:
    """Replicates of SGER, SGER vs control and compute-to-best for one cell on ``exam``
    (default: the domain's MCF exam); None when the per-question records are missing for a
    run the cell needs."""
    task = _val_task(exam or domain)
    if task not in weights:
        return None
    w = weights[task]
    runs = {"specialized": study.run(size, domain), "general": study.run(size, GENERAL),
            "control": study.run(size, f"{CONTROL_PREFIX}{domain}")}
    acc: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for k, r in runs.items():
        if r is not None and r.points and task in r.correct:
            acc[k] = (r.flops, replicate_acc(r.correct[task], w))
    out = CellReplicates(compute_to_best={})
    for k, (f, a) in acc.items():
        i = best_index(a)
        c = f[i]
        out.compute_to_best[k] = np.where(np.all(np.isnan(a), axis=-1), np.nan, c)
    if "specialized" in acc and "general" in acc:
        r = sger_arrays(*acc["general"], *acc["specialized"])
        out.sger, out.sger_flag = r["value"], r["flag"]
    if "specialized" in acc and "control" in acc:
        out.sger_control = sger_arrays(*acc["control"], *acc["specialized"])["value"]
    return out


def test_gain(study: Study, cell: dict, weights: dict[str, np.ndarray]) -> dict | None:
    """Test accuracy of the specialized run's best (val-selected) checkpoint minus the base
    model's, with a paired bootstrap CI over the test questions (same draw for both)."""
    exam, best = cell["formulation"]["exam"], (cell.get("best") or {}).get("specialized")
    run, task = study.run(cell["size"], cell["domain"]), f"mcpt_{exam}_test"
    if best is None or run is None or task not in run.correct or task not in weights:
        return None
    its = run.iterations
    if 0 not in its:
        return None
    acc = replicate_acc(run.correct[task], weights[task])  # [b, points]
    point = replicate_acc(run.correct[task], np.ones((1, run.correct[task].shape[1])))[0]
    i, i0 = its.index(best["iteration"]), its.index(0)
    ci, _ = percentile_ci(acc[:, i] - acc[:, i0])
    return {"exam": exam, "split": "test", "iteration": best["iteration"],
            "base": float(point[i0]), "specialized": float(point[i]),
            "gain": float(point[i] - point[i0]), "gain_ci": ci,
            "above_base": ci is not None and ci[0] > 0}


def summarize_replicates(rep: CellReplicates | None) -> dict:
    """CI record per cell for results.json."""
    if rep is None:
        return {"available": False}
    out: dict = {"available": True}
    if rep.sger is not None:
        ci, frac = percentile_ci(rep.sger)
        out["sger"] = {"ci": ci, "defined_fraction": frac,
                       "not_reached_fraction": float(np.mean(rep.sger_flag == NOT_REACHED))}
    if rep.sger_control is not None:
        ci, frac = percentile_ci(rep.sger_control)
        out["sger_control"] = {"ci": ci, "defined_fraction": frac}
    out["compute_to_best"] = {k: {"ci": percentile_ci(v)[0]}
                              for k, v in (rep.compute_to_best or {}).items()}
    return out


def fit_quantity(params: list[float], point: list[float | None],
                 reps: list[np.ndarray | None], no_ci_reason: str = "no bootstrap "
                 "(per-question records missing)") -> dict:
    """Power law of one quantity over sizes: point fit plus bootstrap CI of a and b.
    Sizes with an undefined point value (or unknown params) are left out of the fit."""
    use = [i for i, (n, y) in enumerate(zip(params, point))
           if n and y is not None and np.isfinite(y) and y > 0]
    res: dict = {"sizes_used": len(use), "params": [params[i] for i in use],
                 "values": [point[i] for i in use]}
    if len(use) < 2:
        res["note"] = f"{len(use)} size(s) with a defined value: no fit (needs 2)"
        return res
    n = np.array([params[i] for i in use])
    a, b = power_law(n, np.array([point[i] for i in use]))
    res.update(a=float(a), b=float(b))
    if len(use) == 2:
        res["note"] = "2 sizes: the fit is exact" + (
            "; the CI comes from the bootstrap" if all(reps[i] is not None for i in use) else "")
    if all(reps[i] is not None for i in use):
        ra, rb = power_law(n, np.stack([reps[i] for i in use], axis=-1))
        res["a_ci"], frac = percentile_ci(ra)
        res["b_ci"], _ = percentile_ci(rb)
        res["replicates_defined_fraction"] = frac
    else:
        res["a_ci"] = res["b_ci"] = None
        res["ci_note"] = no_ci_reason
    return res


def fit_domain(study: Study, cells: dict[str, dict], reps: dict[str, CellReplicates | None],
               domain: str) -> dict:
    """Fits across sizes for one domain: SGER, SGER vs control, compute-to-best (specialized
    and general run), each y = a * N^b."""
    sizes = [s for s in study.sizes if f"{s}/{domain}" in cells]
    params = [study.sizes[s] for s in sizes]
    out: dict = {"formulations": {s: cells[f"{s}/{domain}"]["formulation"]["primary"]
                                  for s in sizes}}

    def rep_of(s, get):
        r = reps.get(f"{s}/{domain}")
        return get(r) if r is not None else None

    def val(d, *path):
        for p in path:
            d = d.get(p) if isinstance(d, dict) else None
        return d

    out["sger"] = fit_quantity(params, [val(cells[f"{s}/{domain}"], "sger", "value")
                                        for s in sizes],
                               [rep_of(s, lambda r: r.sger) for s in sizes])
    if any(cells[f"{s}/{domain}"].get("sger_control") for s in sizes):
        out["sger_control"] = fit_quantity(
            params, [val(cells[f"{s}/{domain}"], "sger_control", "value") for s in sizes],
            [rep_of(s, lambda r: r.sger_control) for s in sizes])
    out["sger_domain_loss"] = fit_quantity(
        params, [val(cells[f"{s}/{domain}"], "sger_domain_loss", "value") for s in sizes],
        [None for _ in sizes], no_ci_reason="no CI: validation loss is not resampled")
    for k in ("specialized", "general"):
        out[f"compute_to_best_{k}"] = fit_quantity(
            params, [val(cells[f"{s}/{domain}"], "compute_to_best", k, "flops") for s in sizes],
            [rep_of(s, lambda r, k=k: (r.compute_to_best or {}).get(k)) for s in sizes])
    return out
