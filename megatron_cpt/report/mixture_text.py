"""The mixture law and the replay recommendation in words and tables (report.md and
``megatron-cpt plan --recommend``, which print the same table)."""
from __future__ import annotations

from megatron_cpt.report.mixture import NAMES, NOT_DETERMINABLE

HEAD = ["domain", "size", "general fraction", "domain loss at budget", "tokens to target",
        "target domain loss"]


def _num(x, fmt="{:.3g}") -> str:
    return "-" if x is None else fmt.format(x)


def _q(q: dict, fmt: str = "{:.3g}") -> str:
    """A value with its CI, or why there is none."""
    if q["determinable"]:
        lo, hi = q["ci"]
        return f"{fmt.format(q['value'])} [{fmt.format(lo)}, {fmt.format(hi)}]"
    if q["value"] is None:
        return f"not reachable ({q['note']})" if q["note"] == NOT_DETERMINABLE else "-"
    return f"{fmt.format(q['value'])} ({q['note']})"


def table_rows(mix: dict) -> list[list[str]]:
    rows = []
    for dom, m in mix["domains"].items():
        rec = m["recommendation"]
        if rec["status"] != "ok":
            rows.append([dom, "-", NOT_DETERMINABLE + " (no fit)", "-", "-", "-"])
            continue
        for size, r in rec["sizes"].items():
            rows.append([dom, size, _q(r["general_fraction"], "{:.1%}"), _q(r["domain_loss"]),
                         _q(r["tokens_to_target"]), _num(r["target_domain_loss"], "{:.4g}")])
    return rows


def plain_table(mix: dict) -> str:
    """Fixed-width text for the terminal."""
    rows = [HEAD] + table_rows(mix)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEAD))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def law_text(f: dict) -> str:
    """The fitted law with its point estimates, as one formula."""
    p = f["params"]
    return (f"L = {p['E']:.3g} + {p['A']:.3g}/n^{p['alpha']:.3g} + {p['B']:.3g}·r^{p['eta']:.3g}"
            f"/d^{p['beta']:.3g} + {p['C']:.3g}/(r + {p['eps']:.3g})^{p['gamma']:.3g}, "
            f"n = N/{f['n_scale']:.3g}, d = D/{f['d_scale']:.3g}")


def fit_summary(domain: str, name: str, f: dict) -> str:
    """One line per fitted loss for the terminal: form, grid, law, held-out and in-sample error."""
    if f["status"] != "ok":
        return f"{domain} {name}: not fitted ({f['reason']})"
    h, g = f.get("heldout") or {}, f["grid"]
    return (f"{domain} {name}: {f['form']} on {g['points']} points from {g['cells']} cells: "
            f"{law_text(f)}; held-out cell (leave-one-cell-out) RMSE {_num(h.get('rmse'))}, "
            f"max |error| {_num(h.get('max_abs'))}; in-sample R² {f['r2']:.3f}, "
            f"RMSE {f['rmse']:.3g}")


def terminal_lines(mix: dict) -> list[str]:
    """The recommendation table and the fits behind it (``plan --recommend``, the demo)."""
    out = [f"replay recommendation: general validation loss at most "
           f"+{mix['general_loss_increase']:g} nats over the base model ({mix['budget_source']}); "
           f"95% CIs from {mix['bootstrap']['replicates']} bootstrap refits over cells",
           plain_table(mix)]
    for dom, m in mix["domains"].items():
        out += [fit_summary(dom, k.replace("_", " "), f) for k, f in m["fits"].items()]
        if c := caveat(mix, m["recommendation"]):
            out.append(f"caveat ({dom}): {c}")
    return out


def _fit_line(name: str, f: dict) -> str:
    if f["status"] != "ok":
        return f"- {name}: **not fitted**: {f['reason']}."
    p, ci = f["params"], f.get("ci") or {}
    terms = ", ".join(f"{k} = {p[k]:.3g}" + (f" [{ci[k][0]:.3g}, {ci[k][1]:.3g}]" if ci.get(k)
                                              else (" (fixed)" if k in f["fixed"] else ""))
                      for k in NAMES)
    h = f.get("heldout") or {}
    g = f["grid"]
    return (f"- {name}: form `{f['form']}` on {g['points']} points from {g['cells']} cells "
            f"({g['sizes']} sizes, {g['shares']} mixture shares); {terms}; "
            f"n = N / {f['n_scale']:.3g}, d = D / {f['d_scale']:.3g}. In-sample R² "
            f"{f['r2']:.3f}, RMSE {f['rmse']:.3g}; **held-out cell** (leave-one-cell-out) RMSE "
            f"{_num(h.get('rmse'))}, max |error| {_num(h.get('max_abs'))}."
            + (f" ({f['note']})" if f.get("note") else ""))


def section(mix: dict) -> list[str]:
    out = ["## Mixture law and replay recommendation", ""]
    if not mix["domains"]:
        return out + ["No replay cells in this study (declare `replay:` in the study YAML).", ""]
    out += [f"Law per domain and loss: L(N, D, r) = E + A/n^α + B·r^η/d^β + C/(r+ε)^γ, r = the "
            f"share of the loss's own corpus in the blend (docs/report.md). Forgetting budget: "
            f"general validation loss at most +{mix['general_loss_increase']:g} nats over the "
            f"base model ({mix['budget_source']}); CIs: {mix['bootstrap']['replicates']} "
            "bootstrap refits over cells.", ""]
    for dom, m in mix["domains"].items():
        out += [f"### {dom}", ""]
        out += [_fit_line(f"{k.replace('_', ' ')}", f) for k, f in m["fits"].items()]
        out += [f"- {n}" for n in m["notes"]] + [""]
    rows = table_rows(mix)
    out += ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    out += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    caveats = [f"Caveat ({dom}): {c}" for dom, m in mix["domains"].items()
               if (c := caveat(mix, m["recommendation"]))]
    return out + ([*caveats, ""] if caveats else [])


def caveat(mix: dict, rec: dict) -> str | None:
    """Why the answer is not to be trusted when the general-loss law's held-out error exceeds
    the forgetting budget (the answer is read off that law against the budget)."""
    h = rec.get("general_loss_heldout_rmse")
    if h is None or rec.get("resolved", True):
        return None
    return (f"the general-loss law misses a held-out cell by {h:.3g} nats (RMSE), more than the "
            f"+{mix['general_loss_increase']:g} budget, so these fractions are below what this "
            "grid resolves.")


def finding(mix: dict) -> list[str]:
    """One sentence per domain for the findings."""
    out = []
    for dom, m in mix["domains"].items():
        rec = m["recommendation"]
        if rec["status"] != "ok":
            why = "; ".join(f["reason"] for f in m["fits"].values() if f["status"] != "ok")
            out.append(f"Replay ({dom}): {NOT_DETERMINABLE}: {why}.")
            continue
        parts = []
        for size, r in rec["sizes"].items():
            parts.append(f"{size}: {_q(r['general_fraction'], '{:.1%}')}")
        out.append(f"Replay ({dom}): to keep general validation loss within "
                   f"+{mix['general_loss_increase']:g} of the base model at the study's budget, "
                   f"the smallest general share is " + "; ".join(parts) + " (95% CI)."
                   + (f" Caveat: {c}" if (c := caveat(mix, rec)) else ""))
    return out
