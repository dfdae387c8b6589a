"""The mixture law: domain and general validation loss over (size N, tokens D, general share).

Why a law: the study's replay cells sample a few general fractions at a few sizes; the
question a team asks ("how much general data must I keep at my size?") lies between them.
Per domain and per loss we fit the D-CPT form (arXiv 2406.01375)

    L(N, D, r) = E + A / n^alpha + B * r^eta / d^beta + C / (r + eps)^gamma

where ``r`` is the share of the loss's *own* corpus in the training blend (1 - g for the
domain loss, g for the general loss, g = the general fraction), ``n = N / n_scale`` and
``d = D / d_scale`` (scales: the grid's geometric means, stored with the fit). The base model
(D = 0) is not a CPT point and is left out. A grid too small for the 9 parameters gets the
documented simpler form (eta = 0, eps = 0.1: 7 parameters), and a grid too small for that is
refused with the reason (``status: refused``), never fitted silently.

Quality is reported as the error predicting a held-out cell (leave-one-cell-out: refit
without the run, predict all its points), next to the in-sample R^2. CIs are bootstrap
percentiles over cells (runs drawn with replacement; a run's checkpoints share its noise, so
the cell, not the point, is the unit).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from megatron_cpt.report.fits import LEVEL, MIN_VALID

NAMES = ("E", "A", "alpha", "B", "beta", "eta", "C", "gamma", "eps")
FORMS = {  # form -> parameters held fixed (all others are fitted)
    "dcpt": {},
    "dcpt_separable": {"eta": 0.0, "eps": 0.1},
}
POINTS_PER_PARAM = 3  # fewer points per free parameter than this and the form is not tried
NOT_DETERMINABLE = "not determinable from this grid"
WARM_NFEV = 300  # refits start at the point fit: a few hundred evaluations converge


@dataclass
class Observations:
    """The points one loss is fitted to (one row per scored checkpoint, D > 0)."""

    n: np.ndarray          # parameters
    d: np.ndarray          # tokens
    r: np.ndarray          # share of the loss's own corpus in the blend, in [0, 1]
    loss: np.ndarray
    cell: list[str] = field(default_factory=list)  # run key of each point (bootstrap unit)

    def take(self, idx) -> "Observations":
        idx = np.asarray(idx, int)
        return Observations(self.n[idx], self.d[idx], self.r[idx], self.loss[idx],
                            [self.cell[i] for i in idx])


def law(p: dict, n, d, r) -> np.ndarray:
    """The D-CPT form on normalized n, d (see the module docstring)."""
    n, d, r = (np.asarray(x, float) for x in (n, d, r))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return (p["E"] + p["A"] / n ** p["alpha"] + p["B"] * r ** p["eta"] / d ** p["beta"]
                + p["C"] / (r + p["eps"]) ** p["gamma"])


def _jacobian(p: dict, free: list[str], n, d, r) -> np.ndarray:
    """d law / d theta for the free parameters (E as is, the others by their logarithm, as
    :func:`_unpack` maps them): analytic, so a fit needs one law evaluation per step instead
    of one per parameter (the bootstrap refits are most of the report's time)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        size = p["A"] / n ** p["alpha"]
        data = p["B"] * r ** p["eta"] / d ** p["beta"]
        mix = p["C"] / (r + p["eps"]) ** p["gamma"]
        logr = np.where(r > 0, np.log(np.where(r > 0, r, 1.0)), 0.0)  # r^eta ln r -> 0 at r = 0
        cols = {"E": np.ones_like(n), "A": size, "alpha": -p["alpha"] * np.log(n) * size,
                "B": data, "beta": -p["beta"] * np.log(d) * data, "eta": p["eta"] * logr * data,
                "C": mix, "gamma": -p["gamma"] * np.log(r + p["eps"]) * mix,
                "eps": -p["gamma"] * p["eps"] * mix / (r + p["eps"])}
    return np.stack([cols[k] for k in free], axis=1)


def _unpack(theta: np.ndarray, free: list[str], fixed: dict) -> dict:
    p = dict(fixed)
    for k, v in zip(free, theta):
        p[k] = float(v) if k == "E" else float(np.exp(v))
    return p


def _fit_once(obs: Observations, n_scale: float, d_scale: float, form: str,
              starts: list[dict], max_nfev: int = 1000) -> tuple[dict | None, float]:
    """Least squares from each start; the lowest cost wins. Returns (params, cost)."""
    from scipy.optimize import least_squares

    fixed = FORMS[form]
    free = [k for k in NAMES if k not in fixed]
    n, d = obs.n / n_scale, obs.d / d_scale
    lo = [-np.inf if k == "E" else (np.log(1e-3) if k in ("alpha", "beta", "eta", "gamma")
                                    else np.log(1e-4) if k == "eps" else -25.0) for k in free]
    hi = [float(np.min(obs.loss)) if k == "E" else (np.log(4.0) if k in (
        "alpha", "beta", "eta", "gamma") else 0.0 if k == "eps" else 10.0) for k in free]
    best, best_cost = None, np.inf
    for s in starts:
        x0 = np.clip([s[k] if k == "E" else np.log(max(s[k], 1e-6)) for k in free],
                     np.array(lo) + 1e-9, np.array(hi) - 1e-9)
        try:
            res = least_squares(lambda t: law(_unpack(t, free, fixed), n, d, obs.r) - obs.loss,
                                x0, jac=lambda t: _jacobian(_unpack(t, free, fixed), free, n, d,
                                                            obs.r),
                                bounds=(lo, hi), method="trf", max_nfev=max_nfev, x_scale="jac")
        except (ValueError, FloatingPointError):
            continue
        if res.status >= 0 and np.isfinite(res.cost) and res.cost < best_cost:  # 0: nfev cap
            best, best_cost = _unpack(res.x, free, fixed), float(res.cost)
    return best, best_cost


def _starts(obs: Observations, rng: np.random.Generator, k: int) -> list[dict]:
    lo, span = float(np.min(obs.loss)), float(np.ptp(obs.loss)) or 0.1
    base = {"E": lo - span, "A": span / 3, "alpha": 0.5, "B": span / 3, "beta": 0.5,
            "eta": 0.5, "C": span / 3, "gamma": 0.5, "eps": 0.05}
    out = [base]
    for _ in range(k - 1):
        out.append({key: (v - span * rng.uniform(0, 2) if key == "E"
                          else v * float(np.exp(rng.normal(0, 1)))) for key, v in base.items()})
    return out


def grid_shape(obs: Observations) -> dict:
    return {"points": int(len(obs.loss)), "cells": len(set(obs.cell)),
            "sizes": int(len(np.unique(obs.n))), "shares": int(len(np.unique(obs.r))),
            "token_values": int(len(np.unique(obs.d)))}


def choose_form(obs: Observations) -> tuple[str | None, str]:
    """The richest form the grid supports, or None with the reason. Each form needs at least
    POINTS_PER_PARAM points per free parameter and 3 distinct values of N (the size term has
    E, A and alpha), of r and of D; the 9-parameter D-CPT form also needs 9 cells."""
    g = grid_shape(obs)
    why = []
    for form, fixed in FORMS.items():
        k = len(NAMES) - len(fixed)
        need = {"points": POINTS_PER_PARAM * k, "sizes": 3, "shares": 3, "token_values": 3,
                "cells": k if form == "dcpt" else 4}
        short = [f"{g[key]} {key} < {v}" for key, v in need.items() if g[key] < v]
        if not short:
            return form, ""
        why.append(f"{form} ({k} parameters): {', '.join(short)}")
    return None, "grid too small to fit: " + "; ".join(why)


def fit_law(obs: Observations, bootstrap: int = 200, seed: int = 0, form: str | None = None,
            n_scale: float | None = None, d_scale: float | None = None,
            starts: int = 4, heldout: bool = True) -> dict:
    """Point fit, bootstrap CIs over cells and leave-one-cell-out error of one loss."""
    shape = grid_shape(obs)
    chosen, why = (form, "") if form else choose_form(obs)
    out: dict = {"grid": shape}
    if chosen is None:
        return {**out, "status": "refused", "reason": why}
    n_scale = n_scale or float(np.exp(np.mean(np.log(obs.n))))
    d_scale = d_scale or float(np.exp(np.mean(np.log(obs.d))))
    rng = np.random.default_rng(seed)
    p, _ = _fit_once(obs, n_scale, d_scale, chosen, _starts(obs, rng, starts))
    if p is None:
        return {**out, "status": "refused", "form": chosen, "reason": "the fit did not converge"}
    pred = law(p, obs.n / n_scale, obs.d / d_scale, obs.r)
    resid = obs.loss - pred
    ss_tot = float(np.sum((obs.loss - obs.loss.mean()) ** 2)) or np.nan
    out.update(status="ok", form=chosen, fixed=dict(FORMS[chosen]), params=p,
               n_scale=n_scale, d_scale=d_scale, r2=float(1 - np.sum(resid ** 2) / ss_tot),
               rmse=float(np.sqrt(np.mean(resid ** 2))), note=why or None)
    cells = sorted(set(obs.cell))
    by_cell = {c: [i for i, x in enumerate(obs.cell) if x == c] for c in cells}
    warm = [p]  # replicates and held-out fits start from the point fit
    reps = []
    for _ in range(bootstrap):
        draw = rng.choice(len(cells), size=len(cells), replace=True)
        sub = obs.take([i for j in draw for i in by_cell[cells[j]]])
        q, _ = _fit_once(sub, n_scale, d_scale, chosen, warm, WARM_NFEV) \
            if choose_form(sub)[0] is not None or form else (None, 0.0)
        reps.append([q[k] if q else np.nan for k in NAMES])
    out["replicates"] = np.array(reps, float).reshape(-1, len(NAMES))
    out["ci"] = {k: _ci(out["replicates"][:, i]) for i, k in enumerate(NAMES)
                 if k not in FORMS[chosen]}
    out["bootstrap"] = {"replicates": bootstrap, "unit": "cell",
                        "converged_fraction": float(np.mean(np.isfinite(out["replicates"][:, 0])))
                        if bootstrap else 0.0}
    if heldout:
        out["heldout"] = _leave_one_cell_out(obs, by_cell, n_scale, d_scale, chosen, p)
    return out


def _leave_one_cell_out(obs, by_cell, n_scale, d_scale, form, p) -> dict:
    """Refit without each cell, predict its points: the error a new cell would see."""
    errs, per_cell = [], {}
    for c, idx in by_cell.items():
        rest = obs.take([i for i in range(len(obs.loss)) if i not in set(idx)])
        q, _ = _fit_once(rest, n_scale, d_scale, form, [p], WARM_NFEV)
        if q is None:
            per_cell[c] = None
            continue
        held = obs.take(idx)
        e = held.loss - law(q, held.n / n_scale, held.d / d_scale, held.r)
        errs += e.tolist()
        per_cell[c] = float(np.sqrt(np.mean(e ** 2)))
    e = np.array(errs)
    return {"rmse": float(np.sqrt(np.mean(e ** 2))) if e.size else None,
            "mae": float(np.mean(np.abs(e))) if e.size else None,
            "max_abs": float(np.max(np.abs(e))) if e.size else None, "per_cell": per_cell}


def _ci(samples: np.ndarray) -> list[float] | None:
    """Percentile CI over replicates that are defined (NaN: fit failed); +inf counts as a
    value (an unreachable target), so an unbounded side shows as inf. None: under MIN_VALID
    of the replicates are defined."""
    s = np.asarray(samples, float)
    ok = ~np.isnan(s)
    if not s.size or ok.mean() < MIN_VALID:
        return None
    v = np.sort(s[ok])
    lo = float(np.quantile(v, LEVEL[0] / 100, method="lower"))
    hi = float(np.quantile(v, LEVEL[1] / 100, method="higher"))
    return [lo, hi]


# --------------------------------------------------------------------------- recommendation
@dataclass
class SizeQuery:
    """What the recommendation needs about one size."""

    size: str
    params: float
    budget_tokens: float      # the study's token budget at this size
    base_general_loss: float  # the base model's general validation loss (iteration 0)


GRID = np.linspace(0.0, 1.0, 1001)  # general fractions searched (0.1 percentage point)


def _answer(pg: dict, pd: dict, s: SizeQuery, n_scale: float, d_scale: float, budget: float,
            target: float | None) -> tuple[float, float, float, float]:
    """(smallest general fraction g meeting the budget, domain loss there at the study's
    budget, tokens to reach ``target`` domain loss at g, the target used) for one parameter
    draw; inf where no fraction meets the budget / the target is never reached."""
    n, d = s.params / n_scale, s.budget_tokens / d_scale
    gen = law(pg, n, d, GRID)  # general loss: own share = g
    ok = np.nonzero(gen <= s.base_general_loss + budget)[0]
    if target is None:  # default: what the pure domain run reaches at the budget
        target = float(law(pd, n, d, 1.0))
    if not ok.size:
        return np.inf, np.nan, np.inf, target
    g = float(GRID[ok[0]])
    own = 1.0 - g
    dom = float(law(pd, n, d, own))
    rest = target - pd["E"] - pd["A"] / n ** pd["alpha"] - pd["C"] / (own + pd["eps"]) ** pd["gamma"]
    coef = pd["B"] * own ** pd["eta"]
    tokens = float(d_scale * (coef / rest) ** (1.0 / pd["beta"])) if rest > 0 and coef > 0 \
        else (0.0 if rest >= 0 else np.inf)
    return g, dom, tokens, target


def _quantity(point: float, reps: np.ndarray) -> dict:
    if not len(reps):
        return {"value": float(point) if np.isfinite(point) else None, "ci": None,
                "determinable": False, "note": "no CI (bootstrap off)"}
    ci = _ci(reps)
    bounded = ci is not None and all(np.isfinite(ci)) and np.isfinite(point)
    return {"value": float(point) if np.isfinite(point) else None,
            "ci": ci if bounded else None, "determinable": bool(bounded),
            "note": None if bounded else NOT_DETERMINABLE}


def recommend(fit_general: dict, fit_domain: dict, sizes: list[SizeQuery], budget: float,
              target: float | None = None) -> dict:
    """Per size: the smallest general fraction whose predicted general loss at the study's
    budget stays within ``budget`` nats of the base model, the domain loss it reaches there,
    and the tokens needed at that fraction to reach ``target`` domain loss (default: the
    pure domain run's predicted loss at the budget); each with its bootstrap CI (the two
    fits' replicates paired by index), "not determinable" where the CI is unbounded."""
    out: dict = {"general_loss_increase": budget, "target_domain_loss": target, "sizes": {}}
    if fit_general.get("status") != "ok" or fit_domain.get("status") != "ok":
        out["status"] = "no fit"
        return out
    out["status"] = "ok"
    pg, pd = fit_general["params"], fit_domain["params"]
    rg, rd = fit_general["replicates"], fit_domain["replicates"]
    for s in sizes:
        g, dom, tok, tgt = _answer(pg, pd, s, fit_general["n_scale"], fit_general["d_scale"],
                                   budget, target)
        reps = []
        for a, b in zip(rg, rd):
            if np.isnan(a).any() or np.isnan(b).any():
                reps.append((np.nan,) * 3)
                continue
            q = _answer(dict(zip(NAMES, a)), dict(zip(NAMES, b)), s, fit_general["n_scale"],
                        fit_general["d_scale"], budget, tgt)
            reps.append(q[:3])
        reps = np.array(reps, float).reshape(-1, 3)
        frac = _quantity(g, reps[:, 0])
        if not frac["determinable"]:  # the others are read at that fraction
            reps[:, 1:] = np.nan
        out["sizes"][s.size] = {
            "params": s.params, "budget_tokens": s.budget_tokens,
            "base_general_loss": s.base_general_loss, "target_domain_loss": tgt,
            "general_fraction": frac,
            "domain_loss": _quantity(dom, reps[:, 1]),
            "tokens_to_target": _quantity(tok, reps[:, 2])}
    return out


# --------------------------------------------------------------------------- from a study
DEFAULT_BUDGET = 0.05     # nats of general validation loss over the base model
MAX_REPLICATES = 200      # bootstrap refits per loss (each refit is a nonlinear fit)


def observations(study, domain: str, loss: str) -> tuple[Observations, list[str]]:
    """Points of the general, domain and replay runs of ``domain`` for ``loss`` (``domain``:
    valid.<domain>.loss, own share 1 - g; ``general``: valid.general.loss, own share g)."""
    from megatron_cpt.report.load import GENERAL

    rows, notes = [], []
    for run in study.runs.values():
        if run.general_fraction is None or (run.domain not in (None, domain)):
            continue
        if run.params is None:
            notes.append(f"{run.key}: parameters unknown; left out of the mixture fit")
            continue
        g = float(run.general_fraction)
        name = domain if loss == "domain" else GENERAL
        for p in run.points:
            v = p.valid.get(name)
            if p.tokens > 0 and v is not None and np.isfinite(v):
                rows.append((run.params, p.tokens, 1.0 - g if loss == "domain" else g, v, run.key))
    if not rows:
        return Observations(*(np.zeros(0) for _ in range(4)), []), notes
    n, d, r, y, c = zip(*rows)
    return Observations(np.array(n), np.array(d), np.array(r), np.array(y), list(c)), notes


def size_queries(study, domain: str) -> list[SizeQuery]:
    """Each size with a scored base model: its parameters, the study's token budget there
    (the most tokens any of its mixture runs trained) and the base general loss."""
    out = []
    for size, params in study.sizes.items():
        runs = [r for r in study.runs.values() if r.size == size and r.points
                and r.general_fraction is not None and r.domain in (None, domain)]
        base = [p.valid.get("general") for r in runs for p in r.points if p.iteration == 0]
        base = [b for b in base if b is not None and np.isfinite(b)]
        tokens = max((p.tokens for r in runs for p in r.points), default=0.0)
        if params and base and tokens > 0:
            out.append(SizeQuery(size, float(params), float(tokens), float(np.mean(base))))
    return out


def analyze_mixture(study, budget: float | None = None, target: float | None = None,
                    bootstrap: int = MAX_REPLICATES, seed: int = 0) -> dict:
    """Per domain with replay cells: the two fits and the recommendation per size."""
    budget_source = "command line" if budget is not None else (
        "study recommend.general_loss_increase" if study.recommend.get("general_loss_increase")
        else f"default ({DEFAULT_BUDGET})")
    budget = budget if budget is not None else float(
        study.recommend.get("general_loss_increase") or DEFAULT_BUDGET)
    reps = min(bootstrap, MAX_REPLICATES)
    out: dict = {"general_loss_increase": budget, "budget_source": budget_source,
                 "target_domain_loss": target, "bootstrap": {"replicates": reps, "unit": "cell"},
                 "domains": {}}
    for domain in study.domains:
        if not any(r.kind == "replay" and r.domain == domain for r in study.runs.values()):
            continue
        fits, notes = {}, []
        for loss in ("domain", "general"):
            obs, why = observations(study, domain, loss)
            notes += why
            f = fit_law(obs, bootstrap=reps, seed=seed) if len(obs.loss) else {
                "status": "refused", "reason": "no scored points", "grid": grid_shape(obs)}
            fits[f"{loss}_loss"] = f
        rec = recommend(fits["general_loss"], fits["domain_loss"],
                        size_queries(study, domain), budget, target)
        # the answer is read off the general-loss law against the budget: a law that misses a
        # held-out cell by more than the budget cannot resolve it, whatever its CI says
        h = (fits["general_loss"].get("heldout") or {}).get("rmse")
        rec["general_loss_heldout_rmse"] = h
        rec["resolved"] = bool(h is not None and h <= budget)
        for f in fits.values():
            f.pop("replicates", None)  # arrays for the recommendation only, not results.json
        out["domains"][domain] = {"fits": fits, "recommendation": rec,
                                  "notes": sorted(set(notes))}
    return out
