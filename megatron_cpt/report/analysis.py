"""Selection, SGER, forgetting at equal compute: the study's comparisons of two runs.

The core functions take plain arrays with optional leading batch dimensions, so the
bootstrap (fits.py) runs the very same code on thousands of resampled accuracy curves.
Points are always sorted by compute (FLOPs), base model (FLOPs 0) first when scored.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_cpt.report.load import CONTROL_PREFIX, GENERAL, Run, Study, ppl_metric

# SGER outcome codes (vectorized); names as written in results.json
OK, NOT_REACHED, BASE_REACHES, GENERAL_NO_IMPROVEMENT, NO_DATA = 0, 1, 2, 3, 4
FLAGS = {OK: "ok", NOT_REACHED: "not_reached", BASE_REACHES: "base_reaches_target",
         GENERAL_NO_IMPROVEMENT: "general_no_improvement", NO_DATA: "no_data"}
_EPS = 1e-9  # accuracies are ratios k/n: compare with a tolerance


def best_index(val: np.ndarray) -> np.ndarray:
    """Index of the best point by validation score over the last axis; NaN (unscored) never
    wins; ties go to the first, i.e. least compute. Rows of all-NaN give 0."""
    v = np.where(np.isnan(val), -np.inf, val)
    top = v.max(axis=-1, keepdims=True)
    return np.argmax(v >= top - _EPS, axis=-1)


def first_reach(flops: np.ndarray, score: np.ndarray, target: np.ndarray):
    """Compute at which the curve ``score`` (``[..., P]`` over ``flops`` ``[P]``) first reaches
    ``target`` (``[...]``), interpolating linearly in compute between the last point below and
    the first point at or above the target; a first point already at the target gives its own
    compute. Returns (compute with NaN where never reached, reached mask)."""
    flops = np.asarray(flops, dtype=float)
    s = np.where(np.isnan(score), -np.inf, score)
    t = np.asarray(target, dtype=float)[..., None]
    hit = s >= t - _EPS
    reached = hit.any(axis=-1)
    i = np.argmax(hit, axis=-1)
    prev = np.maximum(i - 1, 0)
    s_i = np.take_along_axis(s, i[..., None], -1)[..., 0]
    s_p = np.take_along_axis(s, prev[..., None], -1)[..., 0]
    f_i, f_p = flops[i], flops[prev]
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = (t[..., 0] - s_p) / (s_i - s_p)
    ok = (i > 0) & np.isfinite(s_p) & np.isfinite(frac)
    frac = np.clip(np.where(ok, frac, 1.0), 0.0, 1.0)
    compute = np.where(i > 0, f_p + frac * (f_i - f_p), f_i)
    return np.where(reached, compute, np.nan), reached


def sger_arrays(gen_flops, gen_val, spec_flops, spec_val):
    """Vectorized SGER of a specialized (or any second) run against a reference run.

    target = the reference's best validation score; C_ref = its compute at that checkpoint;
    C_spec = compute at which the second run first reaches the target (``first_reach``).
    Returns dict of arrays: value (C_ref / C_spec; NaN unless flag OK), flag, target,
    c_ref, c_spec, bound (C_ref / max compute of the second run, an upper bound on SGER
    when flag is NOT_REACHED).
    """
    gen_flops, spec_flops = np.asarray(gen_flops, float), np.asarray(spec_flops, float)
    gen_val, spec_val = np.asarray(gen_val, float), np.asarray(spec_val, float)
    bg = best_index(gen_val)
    target = np.take_along_axis(gen_val, bg[..., None], -1)[..., 0]
    c_ref = gen_flops[bg]
    c_spec, reached = first_reach(spec_flops, spec_val, target)
    no_data = ~np.isfinite(target) | np.all(np.isnan(spec_val), axis=-1)
    flag = np.full(target.shape, OK)
    flag = np.where(~reached, NOT_REACHED, flag)
    flag = np.where(reached & (c_spec <= 0) & (c_ref > 0), BASE_REACHES, flag)
    flag = np.where(c_ref <= 0, GENERAL_NO_IMPROVEMENT, flag)
    flag = np.where(no_data, NO_DATA, flag)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = np.where(flag == OK, c_ref / np.where(c_spec > 0, c_spec, np.nan), np.nan)
        smax = np.nanmax(np.where(np.isnan(spec_val), -np.inf, spec_flops), axis=-1) \
            if spec_val.size else np.nan
        bound = np.where(flag == NOT_REACHED, c_ref / np.where(smax > 0, smax, np.nan), np.nan)
    return {"value": value, "flag": flag, "target": target, "c_ref": c_ref, "c_spec": c_spec,
            "bound": bound}


def at_equal_compute(spec_flops, spec_y, ref_flops, ref_y):
    """Both curves at the specialized run's checkpoint FLOPs (base model excluded: FLOPs 0)
    that lie within the reference's scored FLOPs range; the reference is linearly
    interpolated. Returns (flops, spec values, reference values) as lists."""
    sf, sy = np.asarray(spec_flops, float), np.asarray(spec_y, float)
    rf, ry = np.asarray(ref_flops, float), np.asarray(ref_y, float)
    keep_r = np.isfinite(ry)
    if keep_r.sum() < 1:
        return [], [], []
    rf, ry = rf[keep_r], ry[keep_r]
    sel = np.isfinite(sy) & (sf > 0) & (sf >= rf.min()) & (sf <= rf.max())
    f = sf[sel]
    return f.tolist(), sy[sel].tolist(), np.interp(f, rf, ry).tolist()


@dataclass
class Best:
    iteration: int
    flops: float
    tokens: float
    val_acc: float
    test_acc: float | None
    test_answer_ppl: float | None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _num(x) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def best_checkpoint(run: Run, exam: str) -> Best | None:
    """The run's best point on ``exam``'s val split (never test); ties -> least compute."""
    val = run.exam(exam, "val")
    if not run.points or np.all(np.isnan(val)):
        return None
    i = int(best_index(val))
    p = run.points[i]
    return Best(p.iteration, p.flops, p.tokens, float(val[i]),
                _num(run.exam(exam, "test")[i]), _num(run.exam(exam, "test", ppl_metric(exam))[i]))


def base_scores(runs: list[Run], exam: str) -> dict | None:
    """The base model's (iteration 0) scores on ``exam``, from the first run that has them."""
    for run in runs:
        for i, p in enumerate(run.points):
            if p.iteration == 0 and exam in p.exams:
                return {"val_acc": _num(run.exam(exam, "val")[i]),
                        "test_acc": _num(run.exam(exam, "test")[i]),
                        "test_answer_ppl": _num(run.exam(exam, "test", ppl_metric(exam))[i]),
                        "from": run.key}
    return None


def sger(ref: Run, spec: Run, exam: str) -> dict:
    """SGER of ``spec`` against ``ref`` (general or control) on ``exam``'s val split, as a
    results.json record."""
    r = sger_arrays(ref.flops, ref.exam(exam, "val"), spec.flops, spec.exam(exam, "val"))
    flag = FLAGS[int(r["flag"])]
    notes = {
        "not_reached": "the specialized run never reaches the reference's best val score; "
                       "SGER < bound (reference compute / specialized run's total compute)",
        "base_reaches_target": "the specialized run's first scored point already reaches the "
                               "target at compute 0: SGER is unbounded",
        "general_no_improvement": "the reference's best val score is at compute 0 (never "
                                  "improves over the base model): SGER undefined",
        "no_data": "no val scores for this exam in one of the runs",
    }
    return {"value": _num(r["value"]), "flag": flag, "bound": _num(r["bound"]),
            "target_val_acc": _num(r["target"]), "reference_flops": _num(r["c_ref"]),
            "specialized_flops": _num(r["c_spec"]), "note": notes.get(flag)}


def sger_domain_loss(ref: Run, spec: Run, domain: str) -> dict:
    """SGER measured on the domain validation loss instead of the exam: the reference's lowest
    ``valid.<domain>.loss`` and the compute the specialized run needs to first get that low
    (same interpolation and flags). Readable where exams are too small or the models too weak
    to move exam accuracy (the toy demo); no bootstrap (it is not a per-question quantity)."""
    r = sger_arrays(ref.flops, -ref.valid(domain), spec.flops, -spec.valid(domain))
    flag = FLAGS[int(r["flag"])]
    return {"value": _num(r["value"]), "flag": flag, "bound": _num(r["bound"]),
            "target_valid_loss": _num(-r["target"]) if r["target"] is not None else None,
            "reference_flops": _num(r["c_ref"]), "specialized_flops": _num(r["c_spec"])}


def _compare(spec: Run, ref: Run, fn) -> dict:
    f, s, g = at_equal_compute(spec.flops, fn(spec), ref.flops, fn(ref))
    d = [a - b for a, b in zip(s, g)]
    return {"flops": f, "specialized": s, "reference": g, "delta": d,
            "mean_delta": float(np.mean(d)) if d else None,
            "delta_at_max_common_flops": d[-1] if d else None}


def forgetting(spec: Run, gen: Run) -> dict:
    """General-domain ability of the specialized run minus the general run's at equal compute:
    general validation loss (positive delta = forgetting) and general exam test accuracy
    (negative delta = forgetting)."""
    loss = _compare(spec, gen, lambda r: r.valid(GENERAL))
    acc = _compare(spec, gen, lambda r: r.exam(GENERAL, "test"))
    return {"general_valid_loss": loss, "general_exam_test_acc": acc}


def domain_loss_effect(spec: Run, ref: Run, domain: str) -> dict:
    """Domain validation loss (valid.<domain>.loss) of spec vs ref at equal compute."""
    c = _compare(spec, ref, lambda r: r.valid(domain))
    return {"flops": c["flops"], "specialized": c["specialized"], "reference": c["reference"],
            "delta": c["delta"], "mean_delta": c["mean_delta"],
            "specialized_lower_everywhere": bool(c["flops"]) and all(x < 0 for x in c["delta"])}


CF_SUFFIX = "_cf"  # CF results are stored under exam "<exam>_cf" (eval/tasks.py)
FORMULATIONS = ("mcf", "cf")


def exam_key(domain: str, formulation: str) -> str:
    return domain + (CF_SUFFIX if formulation == "cf" else "")


def at_chance(acc: float | None, n: int | None, chance: float) -> bool:
    """Accuracy within two binomial standard errors above chance (or below it)."""
    if acc is None or not n:
        return False
    return acc < chance + 2.0 * np.sqrt(chance * (1.0 - chance) / n)


def primary_formulation(study: Study, size: str, domain: str) -> dict:
    """The formulation SGER is computed on for this cell, and why (study setting
    ``eval.primary_formulation``: mcf, cf, or auto = cf below ``cf_below_params`` or where the
    base model's MCF val accuracy is at chance, else mcf)."""
    setting = study.primary or {}
    mode, limit = setting.get("mode", "auto"), float(setting.get("cf_below_params", 2.0e9))
    runs = [r for r in (study.run(size, c) for c in (domain, GENERAL)) if r is not None]
    has_cf = any(exam_key(domain, "cf") in p.exams for r in runs for p in r.points)
    if mode in FORMULATIONS:
        chosen, why = mode, "study setting eval.primary_formulation"
    elif not has_cf:
        chosen, why = "mcf", "no CF scores in this study"
    elif (study.sizes.get(size) or 0) < limit:
        chosen, why = "cf", f"size below eval.cf_below_params ({limit:.3g} parameters)"
    else:
        base = base_scores(runs, domain)
        n = next((p.exams[domain]["val"].get("n") for r in runs for p in r.points
                  if p.iteration == 0 and domain in p.exams), None)
        chance = study.chance.get(f"mcpt_{domain}_val", 0.25)
        if at_chance(base and base["val_acc"], n, chance):
            chosen, why = "cf", f"base model's MCF val accuracy is at chance ({chance:.2f})"
        else:
            chosen, why = "mcf", "base model's MCF val accuracy is above chance"
    return {"primary": chosen, "exam": exam_key(domain, chosen), "reason": why}


def exam_effects(study: Study, size: str, domain: str, exam: str) -> dict:
    """Base scores, best checkpoints and SGER (vs general and vs control) on one exam key."""
    runs = {"specialized": study.run(size, domain), "general": study.run(size, GENERAL),
            "control": study.run(size, f"{CONTROL_PREFIX}{domain}")}
    present = {k: r for k, r in runs.items() if r is not None and r.points}
    spec, gen, ctrl = (present.get(k) for k in ("specialized", "general", "control"))
    best = {k: (b.as_dict() if (b := best_checkpoint(r, exam)) else None)
            for k, r in present.items()}
    return {"exam": exam, "base": base_scores(list(present.values()), exam), "best": best,
            "compute_to_best": {k: ({"flops": b["flops"], "tokens": b["tokens"]} if b else None)
                                for k, b in best.items()},
            "sger": sger(gen, spec, exam) if spec and gen else None,
            "sger_control": sger(ctrl, spec, exam) if spec and ctrl else None}


def analyze_cell(study: Study, size: str, domain: str) -> dict:
    """Everything the report says about one size x domain (point estimates, no bootstrap).
    Exam numbers are on the primary formulation; ``formulations`` holds both."""
    spec = study.run(size, domain)
    gen = study.run(size, GENERAL)
    ctrl = study.run(size, f"{CONTROL_PREFIX}{domain}")
    runs = {"specialized": spec, "general": gen, "control": ctrl}
    present = {k: r for k, r in runs.items() if r is not None and r.points}
    out: dict = {"size": size, "domain": domain, "params": study.sizes.get(size),
                 "runs": {k: (str(r.run_dir.relative_to(study.root))
                              if r.run_dir.is_relative_to(study.root) else str(r.run_dir))
                          for k, r in runs.items() if r is not None},
                 "missing": [k for k, r in runs.items() if (r is None or not r.points)
                             and (k != "control" or r is not None or domain in study.controls)]}
    out["formulation"] = primary_formulation(study, size, domain)
    out["formulations"] = {f: exam_effects(study, size, domain, exam_key(domain, f))
                           for f in FORMULATIONS}
    primary = out["formulations"][out["formulation"]["primary"]]
    out.update({k: primary[k] for k in ("base", "best", "compute_to_best", "sger",
                                        "sger_control")})
    out["sger_domain_loss"] = sger_domain_loss(gen, spec, domain) \
        if "specialized" in present and "general" in present else None
    out["sger_domain_loss_control"] = sger_domain_loss(ctrl, spec, domain) \
        if "specialized" in present and "control" in present else None
    if "specialized" in present and "general" in present:
        out["forgetting_at_equal_compute"] = forgetting(spec, gen)
        out["domain_valid_loss_at_equal_compute"] = _loss_effect(spec, gen, domain, "general")
    else:
        out["forgetting_at_equal_compute"] = None
        out["domain_valid_loss_at_equal_compute"] = None
    if "specialized" in present and "control" in present:
        out["domain_valid_loss_vs_control"] = _loss_effect(spec, ctrl, domain, "control")
    else:
        out["domain_valid_loss_vs_control"] = None
    return out


def _loss_effect(spec, reference, domain: str, reference_name: str) -> dict:
    """The domain validation loss of ``spec`` against ``reference`` at equal compute."""
    eff = domain_loss_effect(spec, reference, domain)
    return {"flops": eff["flops"], "specialized": eff["specialized"], reference_name: eff["reference"],
            "delta": eff["delta"], "mean_delta": eff["mean_delta"],
            "specialized_lower_everywhere": eff["specialized_lower_everywhere"]}
