"""``megatron-cpt report``: compare the runs of a study grid and write the study's report.

load.py reads the study folder, analysis.py compares runs (best checkpoint on val, SGER,
forgetting and domain loss at equal compute), fits.py fits power laws across sizes with
bootstrap CIs over exam questions, plots.py draws the figures and render.py writes
report.md / report.html / results.json. Definitions: docs/report.md.
"""
from __future__ import annotations

from pathlib import Path

DEFINITIONS = {
    "best_checkpoint": "max val acc on exam D over scored points (base model included); "
                       "ties -> least FLOPs; test acc / answer_ppl reported at that point",
    "compute_to_best": "training FLOPs (and tokens) of the best checkpoint",
    "sger": "C_general / C_specialized: C_general = FLOPs of the general run's best val "
            "checkpoint on exam D, C_specialized = FLOPs at which the specialized run first "
            "reaches that val acc, linearly interpolated in FLOPs between the last point below "
            "and the first at/above it (first point: its own FLOPs)",
    "sger_flags": "not_reached: value null, bound = C_general / specialized total FLOPs "
                  "(SGER < bound); base_reaches_target: specialized reaches it at 0 FLOPs "
                  "(unbounded, null); general_no_improvement: general best is at 0 FLOPs "
                  "(undefined, null); no_data",
    "sger_control": "same with the control_D run in place of the general run",
    "sger_domain_loss": "SGER on valid.<D>.loss: the general run's lowest domain validation "
                        "loss and the compute the specialized run needs to first get that low "
                        "(same interpolation and flags; point estimate, no bootstrap)",
    "forgetting": "specialized minus general at equal compute (specialized checkpoints' FLOPs "
                  "within the general run's range, general linearly interpolated, base "
                  "excluded) of valid.general.loss and of general exam TEST acc",
    "domain_valid_loss_at_equal_compute": "valid.<D>.loss specialized vs general at equal "
                                          "compute (same points); delta = specialized - general",
    "bootstrap": "per replicate each exam split's questions are drawn with replacement once "
                 "and applied to every checkpoint of every run; CIs are 2.5/97.5 percentiles "
                 "over replicates where the value is defined (null if < 50% are)",
    "fits": "y = a * N^b by least squares in log-log over sizes with a defined value",
    "formulations": "mcf: lettered options, the answer letter scored (acc, acc_norm, "
                    "answer_ppl of the letter); cf: the question alone, each choice's text "
                    "scored as the continuation (acc, acc_norm per character, acc_norm_tok per "
                    "token, answer_ppl of the whole answer, answer_ppl_tok per token). Exam "
                    "SGER, best checkpoints and fits use the primary formulation per cell",
    "primary_formulation": "study setting eval.primary_formulation: mcf, cf, or auto = cf "
                           "when the size has fewer parameters than eval.cf_below_params or "
                           "the base model's MCF val acc is within 2 binomial standard errors "
                           "of chance, else mcf",
    "mixture_law": "per domain and loss: L(N, D, r) = E + A/n^alpha + B r^eta / d^beta + "
                   "C/(r + eps)^gamma over the general, domain and replay runs' checkpoints "
                   "(D > 0), r = share of the loss's own corpus, n and d divided by the grid's "
                   "geometric means; dcpt_separable fixes eta = 0, eps = 0.1 on smaller grids; "
                   "CIs: bootstrap over cells (at most 200 refits); heldout: leave-one-cell-out",
    "replay_recommendation": "per size: smallest general fraction whose predicted general "
                             "validation loss at the study's token budget is within the "
                             "forgetting budget of the base model's, the predicted domain loss "
                             "there, and the tokens to reach the target domain loss at it "
                             "(default target: the pure domain run's predicted loss at the "
                             "budget); 'not determinable from this grid' when a CI is unbounded",
    "test_gain_over_base": "test acc (primary formulation) of the specialized run's best "
                           "val checkpoint minus the base model's, paired bootstrap CI over "
                           "test questions",
}


def build_report(study_dir: Path, out_dir: Path | None = None, bootstrap: int = 1000,
                 seed: int = 0, strict: bool = False, forgetting_budget: float | None = None,
                 target_domain_loss: float | None = None) -> dict:
    """Analyze the study at ``study_dir``, write report.md/.html, results.json and PNGs into
    ``out_dir`` (default STUDY/report). Returns the results.json dict (``skipped``: the eval
    files that could not be read). ``strict``: an unreadable eval file is a UsageError raised
    before anything is written, since a skipped point silently moves SGER and the fits."""
    from megatron_cpt.errors import UsageError
    from megatron_cpt.report import plots, render
    from megatron_cpt.report.load import load_study

    study_dir = Path(study_dir)
    study = load_study(study_dir, splits=("val", "test"))
    if strict and study.skipped:
        path, why = next(iter(study.skipped.items()))
        more = f" (and {len(study.skipped) - 1} more)" if len(study.skipped) > 1 else ""
        raise UsageError(f"{path}: unreadable ({why}){more}; --strict refuses a study with a "
                         "skipped eval file: re-run `megatron-cpt eval run` for it, or drop --strict")
    out = Path(out_dir) if out_dir is not None else study_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    results = analyze(study, bootstrap, seed, forgetting_budget, target_domain_loss)
    results["study_dir"] = str(study_dir)
    results["skipped"] = dict(study.skipped)
    results["plots"] = [p.name for p in plots.all_plots(study, results["cells"], out)]
    render.write_all(results, out)
    return results


def analyze(study, bootstrap: int = 1000, seed: int = 0, forgetting_budget: float | None = None,
            target_domain_loss: float | None = None) -> dict:
    """Point estimates, bootstrap CIs and fits for an in-memory study (no files written)."""
    from megatron_cpt.report import analysis, fits, mixture

    missing, notes = list(study.missing), list(study.notes)
    cells: dict[str, dict] = {}
    for size in study.sizes:
        for d in study.domains:
            if study.run(size, d) is None and study.run(size, "general") is None \
                    and study.run(size, f"control_{d}") is None:
                continue
            cells[f"{size}/{d}"] = analysis.analyze_cell(study, size, d)
    reps: dict = {}
    weights = fits.question_weights(study, bootstrap, seed) if bootstrap > 0 else {}
    for key, c in cells.items():
        rep = fits.cell_replicates(study, c["size"], c["domain"], weights,
                                   c["formulation"]["exam"]) if weights else None
        reps[key] = rep
        c["bootstrap"] = fits.summarize_replicates(rep)
        c["bootstrap"]["test_gain_over_base"] = fits.test_gain(study, c, weights) \
            if weights else None
        if rep is None and bootstrap > 0:
            notes.append(f"{key}: no bootstrap CI (no per-question records for mcpt_"
                         f"{c['formulation']['exam']}_val)")
        if c["sger"] is None:
            why = "no general run with evaluations" if "general" in c["missing"] else \
                "no specialized run with evaluations"
            notes.append(f"{key}: no SGER ({why})")
    fitted: dict = {}
    if sum(1 for n in study.sizes.values() if n) < 2:
        notes.append(f"{len(study.sizes)} size(s) with known parameters < 2: no fits across sizes")
    else:
        for d in study.domains:
            fitted[d] = fits.fit_domain(study, cells, reps, d)
    compared = [c["domain_valid_loss_at_equal_compute"] for c in cells.values()
                if c.get("domain_valid_loss_at_equal_compute")
                and c["domain_valid_loss_at_equal_compute"]["flops"]]
    lower = sum(1 for x in compared if x["specialized_lower_everywhere"])
    summary = {"domain_valid_loss": {
        "cells_compared": len(compared), "specialized_lower_everywhere": lower,
        "all_cells_lower_everywhere": bool(compared) and lower == len(compared)}}
    return {"study": study.name, "sizes": dict(study.sizes), "domains": list(study.domains),
            "definitions": DEFINITIONS, "bootstrap": {"replicates": bootstrap, "seed": seed},
            "summary": summary, "cells": cells, "fits": fitted, "missing": missing,
            "notes": notes, "mixture": mixture.analyze_mixture(
                study, forgetting_budget, target_domain_loss, bootstrap, seed)}
