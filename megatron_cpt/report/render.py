"""results.json -> report.md and a self-contained report.html (PNG plots inlined as base64).

The HTML comes from our own tiny Markdown subset renderer (headings, paragraphs, bullet
lists, pipe tables, images, code spans) so the report needs no extra dependency.
"""
from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path


def _e(x: float | None, fmt: str = "{:.3g}") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def _acc(x) -> str:
    return _e(x, "{:.3f}")


def _ci(ci) -> str:
    return f" [{_e(ci[0])}, {_e(ci[1])}]" if ci else ""


def _sger_cell(s: dict | None, ci) -> str:
    if not s:
        return "-"
    if s["value"] is not None:
        return _e(s["value"]) + _ci(ci)
    if s["flag"] == "not_reached" and s["bound"] is not None:
        return f"< {_e(s['bound'])} (not reached)"
    return s["flag"]


def _dig(d, *path):
    for p in path:
        d = d.get(p) if isinstance(d, dict) else None
    return d


def summary_rows(results: dict) -> list[list[str]]:
    rows = []
    for key, c in results["cells"].items():
        best = c.get("best") or {}
        sp, ge = best.get("specialized") or {}, best.get("general") or {}
        f = c.get("forgetting_at_equal_compute") or {}
        dl = c.get("domain_valid_loss_at_equal_compute")
        gain = _dig(c, "bootstrap", "test_gain_over_base")
        rows.append([
            c["size"], c["domain"], _dig(c, "formulation", "primary") or "mcf",
            _acc(_dig(c, "base", "test_acc")),
            _acc(sp.get("test_acc")) + (f" ({gain['gain']:+.3f}{_ci(gain['gain_ci'])})"
                                        if gain else ""),
            _e(sp.get("flops")), _acc(ge.get("test_acc")),
            _sger_cell(c.get("sger"), _dig(c, "bootstrap", "sger", "ci")),
            _sger_cell(c.get("sger_control"), _dig(c, "bootstrap", "sger_control", "ci")),
            _sger_cell(c.get("sger_domain_loss"), None),
            _e(_dig(f, "general_valid_loss", "delta_at_max_common_flops"), "{:+.3f}"),
            _e(_dig(f, "general_exam_test_acc", "delta_at_max_common_flops"), "{:+.3f}"),
            "-" if not dl or dl["mean_delta"] is None else
            f"{dl['mean_delta']:+.3f} ({'lower everywhere' if dl['specialized_lower_everywhere'] else 'not lower everywhere'})",
        ])
    return rows


SUMMARY_HEAD = ["size", "domain", "exam format", "base test acc",
                "best test acc (spec.) (Δ vs base [95% CI])",
                "FLOPs to best (spec.)", "best test acc (general)", "SGER [95% CI]",
                "SGER vs control", "SGER (domain loss)", "Δ general loss", "Δ general test acc",
                "Δ domain loss (spec. − general)"]


FLAG_TEXT = {
    "general_no_improvement": "the reference (general or control) run never beats the base "
                              "model on the val split, so there is no target to reach: SGER "
                              "is undefined (the exam did not move, not an effect of zero)",
    "not_reached": "the specialized run never reaches the reference's best val score within "
                   "its budget; the value shown is an upper bound on SGER",
    "base_reaches_target": "the base model already scores the reference's best: SGER is "
                           "unbounded",
    "no_data": "one of the two runs has no val scores on this exam",
}


def flag_notes(rows: list[list[str]]) -> list[str]:
    """One line per SGER flag that occurs in ``rows``: flags explained where they appear."""
    text = " ".join(" ".join(r) for r in rows)
    return [f"- `{f}`: {t}" for f, t in FLAG_TEXT.items() if f in text]


def formulation_rows(results: dict) -> list[list[str]]:
    """Both exam formulations per cell: base and best (val-selected) test acc and answer ppl."""
    rows = []
    for c in results["cells"].values():
        for f, fx in (c.get("formulations") or {}).items():
            best = fx.get("best") or {}
            sp, ge = best.get("specialized") or {}, best.get("general") or {}
            rows.append([c["size"], c["domain"], f + (" (primary)" if f == _dig(
                c, "formulation", "primary") else ""), _acc(_dig(fx, "base", "test_acc")),
                _acc(sp.get("test_acc")), _acc(ge.get("test_acc")),
                _e(_dig(fx, "base", "test_answer_ppl")), _e(sp.get("test_answer_ppl")),
                _sger_cell(fx.get("sger"), None)])
    return rows


FORMULATION_HEAD = ["size", "domain", "format", "base test acc", "best test acc (spec.)",
                    "best test acc (general)", "base answer ppl", "answer ppl (spec. best)",
                    "SGER"]


def findings(r: dict) -> list[str]:
    """The opening section: what was measured and what it showed, in plain words."""
    cells = list(r["cells"].values())
    sizes = ", ".join(f"{s} ({_e(n)} parameters)" if n else s for s, n in r["sizes"].items())
    out = ["## Findings", "",
           f"Measured: continued pretraining of {len(r['sizes'])} model size(s) ({sizes}) on the "
           f"domain corpora {', '.join(r['domains'])}, the general corpus and size-matched "
           "controls; every checkpoint and the base model scored on each domain's exam in two "
           "formats (MCF: lettered options; CF: the answer text) and on validation loss.", ""]
    for c in cells:
        form, gain = c.get("formulation") or {}, _dig(c, "bootstrap", "test_gain_over_base")
        s, ci = c.get("sger"), _dig(c, "bootstrap", "sger", "ci")
        line = f"- **{c['size']} {c['domain']}** ({form.get('primary', 'mcf').upper()}: " \
               f"{form.get('reason', 'default')}): "
        if gain:
            verdict = "above the base model" if gain["above_base"] else \
                "not distinguishable from the base model"
            line += (f"specialized test acc {_acc(gain['specialized'])} vs base "
                     f"{_acc(gain['base'])}, {gain['gain']:+.3f}{_ci(gain['gain_ci'])}: "
                     f"{verdict}; ")
        if s and s["value"] is not None:
            line += f"exam SGER {_e(s['value'])}{_ci(ci)} (general run's best reached with " \
                    f"{_e(1 / s['value'] if s['value'] else None, '{:.0%}')} of its compute)."
        elif s:
            line += f"exam SGER not measured: `{s['flag']}` ({FLAG_TEXT.get(s['flag'], '')})."
        else:
            line += "no exam SGER (a run is missing)."
        out.append(line)
    d = r["summary"]["domain_valid_loss"]
    out += ["", f"Domain validation loss: the specialized run is lower than the general run at "
            f"every common compute point in {d['specialized_lower_everywhere']} of "
            f"{d['cells_compared']} cells."]
    out += _forgetting_finding(cells)
    for dom, fits in r["fits"].items():
        f = fits.get("sger") or {}
        if "b" in f:
            out.append(f"SGER across sizes ({dom}): SGER ∝ N^b with b = {_e(f['b'])}"
                       f"{_ci(f.get('b_ci'))} over {f['sizes_used']} sizes.")
        else:
            out.append(f"SGER across sizes ({dom}): not fitted ({f.get('note', 'no data')}).")
    if r.get("mixture"):
        from megatron_cpt.report import mixture_text

        out += mixture_text.finding(r["mixture"])
    gaps = [m for m in r["missing"]] + [f"{c['size']}/{c['domain']}: MCF at chance on the base "
                                        "model" for c in cells
                                        if "at chance" in (_dig(c, "formulation", "reason") or "")]
    gaps += _unmoved_formats(cells)
    if gaps:
        out += ["", "Not measured: " + "; ".join(gaps) + "."]
    return out + [""]


def _forgetting_finding(cells: list[dict]) -> list[str]:
    """Forgetting in one sentence: specialized minus general at the largest common compute."""
    loss = [f["general_valid_loss"]["delta_at_max_common_flops"] for c in cells
            if (f := c.get("forgetting_at_equal_compute"))
            and f.get("general_valid_loss", {}).get("delta_at_max_common_flops") is not None]
    acc = [f["general_exam_test_acc"]["delta_at_max_common_flops"] for c in cells
           if (f := c.get("forgetting_at_equal_compute"))
           and (f.get("general_exam_test_acc") or {}).get("delta_at_max_common_flops") is not None]
    if not loss:
        return []
    line = (f"Forgetting (specialized − general at the largest common compute): general "
            f"validation loss {min(loss):+.3f} to {max(loss):+.3f}, higher in "
            f"{sum(x > 0 for x in loss)} of {len(loss)} cells")
    if acc:
        line += f"; general exam test accuracy {min(acc):+.3f} to {max(acc):+.3f}"
    return [line + "."]


def _unmoved_formats(cells: list[dict]) -> list[str]:
    """Non-primary formats on which no run moved: say so, rather than show a row of flags."""
    out = []
    for form in ("mcf", "cf"):
        rows = [c for c in cells if _dig(c, "formulation", "primary") != form
                and _dig(c, "formulations", form, "sger", "flag") == "general_no_improvement"
                and _dig(c, "formulations", form, "best", "specialized", "val_acc") is not None
                and _dig(c, "formulations", form, "best", "specialized", "val_acc")
                <= (_dig(c, "formulations", form, "base", "val_acc") or 0) + 1e-9]
        if rows:
            out.append(f"{form.upper()} in {len(rows)} cell(s) "
                       f"({', '.join(c['size'] + '/' + c['domain'] for c in rows)}): neither the "
                       "specialized nor the general run beat the base model on val, so that "
                       "format has no SGER there (too small a model for it; the primary format "
                       "carries the comparison)")
    return out


def md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(x).replace("|", "/") for x in r) + " |" for r in rows]
    return "\n".join(lines)


def summary_table(results: dict) -> str:
    return md_table(SUMMARY_HEAD, summary_rows(results))


def _fit_line(name: str, f: dict) -> str:
    if "b" not in f:
        return f"- {name}: {f.get('note', 'no fit')}"
    ci_a = _ci(f.get("a_ci")) if f.get("a_ci") else ""
    ci_b = _ci(f.get("b_ci")) if f.get("b_ci") else ""
    extra = f" ({f['note']})" if f.get("note") else ""
    extra += f" ({f['ci_note']})" if f.get("ci_note") else ""
    return f"- {name}: y = a·N^b with a = {_e(f['a'])}{ci_a}, b = {_e(f['b'])}{ci_b}{extra}"


def _cell_section(key: str, c: dict) -> list[str]:
    """One cell's details: best checkpoints per run, SGERs with their targets, equal-compute
    deltas."""
    out = [f"### {key}", ""]
    if c["missing"]:
        out += [f"Missing runs: {', '.join(c['missing'])}.", ""]
    rows = []
    for k, b in (c.get("best") or {}).items():
        if b:
            ctb = _dig(c, "bootstrap", "compute_to_best", k, "ci")
            rows.append([k, str(b["iteration"]), _e(b["flops"]) + _ci(ctb), _e(b["tokens"]),
                         _acc(b["val_acc"]), _acc(b["test_acc"]), _e(b["test_answer_ppl"])])
    if rows:
        out += [md_table(["run", "best iteration (val)", "FLOPs [95% CI]", "tokens",
                          "val acc", "test acc", "test answer ppl"], rows), ""]
    for name in ("sger", "sger_control"):
        s = c.get(name)
        if s:
            ci = _dig(c, "bootstrap", name, "ci")
            out.append(f"- {name}: {_sger_cell(s, ci)}; target val acc "
                       f"{_acc(s['target_val_acc'])} reached by the reference at "
                       f"{_e(s['reference_flops'])} FLOPs, by the specialized run at "
                       f"{_e(s['specialized_flops'])} FLOPs"
                       + (f". {s['note']}" if s.get("note") else ""))
    for name in ("sger_domain_loss", "sger_domain_loss_control"):
        s = c.get(name)
        if s:
            out.append(f"- {name}: {_sger_cell(s, None)}; target {c['domain']} valid loss "
                       f"{_e(s['target_valid_loss'], '{:.4f}')} reached by the reference at "
                       f"{_e(s['reference_flops'])} FLOPs, by the specialized run at "
                       f"{_e(s['specialized_flops'])} FLOPs")
    f = c.get("forgetting_at_equal_compute")
    if f:
        gl, ga = f["general_valid_loss"], f["general_exam_test_acc"]
        out.append(f"- forgetting: general valid loss Δ mean {_e(gl['mean_delta'], '{:+.4f}')}"
                   f" over {len(gl['flops'])} common compute points; general exam test acc "
                   f"Δ mean {_e(ga['mean_delta'], '{:+.4f}')}")
    dl = c.get("domain_valid_loss_at_equal_compute")
    if dl:
        out.append(f"- domain valid loss Δ (spec. − general) mean {_e(dl['mean_delta'], '{:+.4f}')}"
                   f", lower at every common point: {dl['specialized_lower_everywhere']}")
    dc = c.get("domain_valid_loss_vs_control")
    if dc:
        out.append(f"- domain valid loss Δ (spec. − control) mean {_e(dc['mean_delta'], '{:+.4f}')}"
                   f", lower at every common point: {dc['specialized_lower_everywhere']}")
    return out + [""]


def to_markdown(results: dict) -> str:
    r = results
    out = [f"# Study report: {r['study']}", "",
           f"{len(r['cells'])} size × domain cells, sizes {', '.join(r['sizes']) or '-'}, "
           f"domains {', '.join(r['domains']) or '-'}; bootstrap: {r['bootstrap']['replicates']} "
           f"replicates over exam questions (seed {r['bootstrap']['seed']}). Best checkpoints are "
           "selected on the exam's **val** split; test accuracies are reported at them. "
           "Compute is training FLOPs of continued pretraining (base model = 0). "
           "Δ columns: specialized minus general at equal compute (largest common FLOPs; "
           "loss: positive = worse). Definitions: docs/report.md.", ""]
    out += findings(r)
    if r["plots"]:
        out += ["## Plots", ""] + [f"![{Path(p).stem}]({p})\n" for p in r["plots"]]
    rows = summary_rows(r)
    out += ["## Summary (primary exam format per cell)", "", md_table(SUMMARY_HEAD, rows), ""]
    out += flag_notes(rows) + [""]
    frows = formulation_rows(r)
    if frows:
        out += ["## Both exam formats", "", md_table(FORMULATION_HEAD, frows), ""]
        out += flag_notes(frows) + [""]
    s = r["summary"]["domain_valid_loss"]
    out += [f"Domain validation loss, specialized vs general at equal compute: lower at every "
            f"common compute point in {s['specialized_lower_everywhere']} of {s['cells_compared']} "
            "compared cells.", ""]
    if r["missing"]:
        out += ["## Missing", ""] + [f"- {m}" for m in r["missing"]] + [""]
    out += ["## Fits across model sizes", ""]
    if not r["fits"]:
        out += ["No fits (needs at least 2 sizes with known parameters).", ""]
    for d, fits in r["fits"].items():
        forms = ", ".join(f"{k}: {v}" for k, v in (fits.get("formulations") or {}).items())
        out += [f"### {d}", "", f"Exam format per size: {forms}.", ""]
        out += [_fit_line(k, v) for k, v in fits.items() if k != "formulations"] + [""]
    if r.get("mixture"):
        from megatron_cpt.report import mixture_text

        out += mixture_text.section(r["mixture"])
    out += ["## Cells", ""]
    for key, c in r["cells"].items():
        out += _cell_section(key, c)
    if r["notes"]:
        out += ["## Notes", ""] + [f"- {n}" for n in r["notes"]] + [""]
    return "\n".join(out) + "\n"


def _inline(text: str, base: Path) -> str:
    def img(m):
        src = base / m.group(2)
        if src.is_file():
            data = base64.b64encode(src.read_bytes()).decode()
            return f'<img alt="{html.escape(m.group(1))}" src="data:image/png;base64,{data}">'
        return html.escape(m.group(0))

    parts = re.split(r"(!\[[^\]]*\]\([^)]+\))", text)
    out = []
    for p in parts:
        m = re.fullmatch(r"!\[([^\]]*)\]\(([^)]+)\)", p)
        if m:
            out.append(img(m))
        else:
            s = html.escape(p)
            s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
            s = re.sub(r"`(.+?)`", r"<code>\1</code>", s)
            out.append(s)
    return "".join(out)


def to_html(md: str, base: Path, title: str) -> str:
    """Render our Markdown subset; images under ``base`` are embedded as data URIs."""
    body, lines, i = [], md.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line[level:].strip(), base)}</h{level}>")
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                if not re.fullmatch(r"\|(---\|)+", lines[i]):
                    rows.append([c.strip() for c in lines[i].strip("|").split(" | ")])
                i += 1
            body.append("<table>" + "".join(
                "<tr>" + "".join(f"<{t}>{_inline(c, base)}</{t}>" for c in r) + "</tr>"
                for t, r in [("th", rows[0])] + [("td", r) for r in rows[1:]]) + "</table>")
            continue
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:], base)}</li>")
                i += 1
            body.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif line.strip():
            body.append(f"<p>{_inline(line, base)}</p>")
        i += 1
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
             "table{border-collapse:collapse;font-size:0.85em}td,th{border:1px solid #bbb;"
             "padding:2px 6px}img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body>\n" + "\n".join(body) +
            "\n</body></html>\n")


def _clean(x):
    """JSON without NaN/inf (strict parsers reject them): non-finite floats -> null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


REPORT_FILES = {"md": "report.md", "html": "report.html", "json": "results.json"}  # in OUT


def write_all(results: dict, out: Path) -> dict[str, Path]:
    out = Path(out)
    md = to_markdown(results)
    paths = {k: out / name for k, name in REPORT_FILES.items()}
    paths["md"].write_text(md)
    paths["html"].write_text(to_html(md, out, f"Study report: {results['study']}"))
    paths["json"].write_text(json.dumps(_clean(results), indent=1))
    return paths
