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
        rows.append([
            c["size"], c["domain"], _acc(_dig(c, "base", "test_acc")),
            _acc(sp.get("test_acc")), _e(sp.get("flops")), _acc(ge.get("test_acc")),
            _sger_cell(c.get("sger"), _dig(c, "bootstrap", "sger", "ci")),
            _sger_cell(c.get("sger_control"), _dig(c, "bootstrap", "sger_control", "ci")),
            _sger_cell(c.get("sger_domain_loss"), None),
            _e(_dig(f, "general_valid_loss", "delta_at_max_common_flops"), "{:+.3f}"),
            _e(_dig(f, "general_exam_test_acc", "delta_at_max_common_flops"), "{:+.3f}"),
            "-" if not dl or dl["mean_delta"] is None else
            f"{dl['mean_delta']:+.3f} ({'lower everywhere' if dl['specialized_lower_everywhere'] else 'not lower everywhere'})",
        ])
    return rows


SUMMARY_HEAD = ["size", "domain", "base test acc", "best test acc (spec.)",
                "FLOPs to best (spec.)", "best test acc (general)", "SGER [95% CI]",
                "SGER vs control", "SGER (domain loss)", "Δ general loss", "Δ general test acc",
                "Δ domain loss (spec. − general)"]


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


def to_markdown(results: dict) -> str:
    r = results
    out = [f"# Study report: {r['study']}", "",
           f"{len(r['cells'])} size × domain cells, sizes {', '.join(r['sizes']) or '-'}, "
           f"domains {', '.join(r['domains']) or '-'}; bootstrap: {r['bootstrap']['replicates']} "
           f"replicates over exam questions (seed {r['bootstrap']['seed']}). Best checkpoints are "
           "selected on the exam's **val** split; test accuracies are reported at them. "
           "Compute is training FLOPs of continued pretraining (base model = 0). "
           "Δ columns: specialized minus general at equal compute (largest common FLOPs; "
           "loss: positive = worse). Definitions: docs/report.md.", "",
           "## Summary", "", summary_table(r), ""]
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
        out += [f"### {d}", ""] + [_fit_line(k, v) for k, v in fits.items()] + [""]
    out += ["## Cells", ""]
    for key, c in r["cells"].items():
        out += [f"### {key}", ""]
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
        out.append("")
    if r["plots"]:
        out += ["## Plots", ""] + [f"![{Path(p).stem}]({p})\n" for p in r["plots"]]
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


def write_all(results: dict, out: Path) -> dict[str, Path]:
    out = Path(out)
    md = to_markdown(results)
    paths = {"md": out / "report.md", "html": out / "report.html", "json": out / "results.json"}
    paths["md"].write_text(md)
    paths["html"].write_text(to_html(md, out, f"Study report: {results['study']}"))
    paths["json"].write_text(json.dumps(_clean(results), indent=1))
    return paths
