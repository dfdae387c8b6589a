"""Write the README's demo picture, table and quoted figures from one demo run, so the numbers
in the README are never typed by hand:

    python -m megatron_cpt.report.readme demo_out [--readme README.md]

Replaces the text between ``<!-- demo:NAME -->`` and ``<!-- /demo:NAME -->`` for NAME in
``picture`` and ``table`` (and ``mixture`` when the run has replay cells: the fitted mixture
law, its held-out error and the replay recommendation) and copies the exam plot to
docs/img/demo_exam.png.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

from megatron_cpt.errors import UsageError
from megatron_cpt.report.render import _acc, _ci, _e, flag_notes, formulation_rows, \
    md_table, summary_rows, FORMULATION_HEAD, SUMMARY_HEAD

IMAGE = Path("docs/img/demo_exam.png")


def _effects(results: dict) -> list[dict]:
    """Per cell: the primary format's test gain over base and exam SGER, when measured."""
    out = []
    for c in results["cells"].values():
        gain = (c.get("bootstrap") or {}).get("test_gain_over_base")
        out.append({"cell": f"{c['size']} {c['domain']}", "gain": gain, "sger": c.get("sger"),
                    "form": (c.get("formulation") or {}).get("primary", "mcf")})
    return out


def picture_block(results: dict, image: Path) -> str:
    eff = _effects(results)
    sger = [e for e in eff if e["sger"] and e["sger"]["value"] is not None]
    above = [e for e in eff if e["gain"] and e["gain"]["above_base"]]
    size = list(results["sizes"])[-1]
    lines = [f"![demo: exam accuracy vs compute ({size})]({image.as_posix()})", "",
             f"*From the demo's report ({size}, {_e(results['sizes'][size])} parameters; "
             f"all numbers written by `python -m megatron_cpt.report.readme`): "
             f"specialized runs beat the base model on their domain's test exam (bootstrap CI "
             f"of the gain excludes 0) in {len(above)} of {len(eff)} cells"]
    if sger:
        vals = sorted(e["sger"]["value"] for e in sger)
        over = sum(v > 1 for v in vals)
        lines[-1] += (f"; the exam SGER (general run's compute to its best val accuracy / the "
                      f"specialized run's compute to reach it) is defined in {len(sger)} cells, "
                      f"{_e(vals[0])} to {_e(vals[-1])}, above 1 in {over}")
    lines[-1] += ". Exam format: " + ", ".join(sorted({e["form"].upper() for e in eff})) + \
        " (docs/report.md: CF below 2e9 parameters or where MCF is at chance).*"
    return "\n".join(lines)


def table_block(results: dict, summary: dict | None) -> str:
    rows = summary_rows(results)
    frows = formulation_rows(results)
    out = [md_table(SUMMARY_HEAD, rows), "", *flag_notes(rows), "",
           "Both exam formats per cell (best checkpoint of each format chosen on its val split):",
           "", md_table(FORMULATION_HEAD, frows), ""]
    gains = [(e["cell"], e["gain"]) for e in _effects(results) if e["gain"]]
    if gains:
        out.append("Test accuracy gain over the base model (primary format, 95% paired "
                   "bootstrap CI): " + "; ".join(
                       f"{c} {_acc(g['base'])} -> {_acc(g['specialized'])}{_ci(g['gain_ci'])}"
                       for c, g in gains) + ".")
    if summary:
        t = summary.get("timings_s", {})
        out.append("Demo stage times on this run: " + ", ".join(
            f"{k} {v:.0f} s" for k, v in t.items()) + f" ({summary.get('executor')} executor).")
    return "\n".join(out)


def mixture_block(results: dict) -> str | None:
    """The mixture law as fitted on the run's replay cells and the recommendation table; None
    when the run has none."""
    from megatron_cpt.report.mixture_text import HEAD, caveat, fit_summary, table_rows

    mix = results.get("mixture") or {}
    if not mix.get("domains"):
        return None
    out = [f"The same run's mixture law and replay recommendation (report.md, \"Mixture law and "
           f"replay recommendation\"; forgetting budget +{mix['general_loss_increase']:g} nats of "
           f"general validation loss over the base model, 95% CIs from "
           f"{mix['bootstrap']['replicates']} bootstrap refits over cells):", ""]
    for dom, m in mix["domains"].items():
        out += [f"- {fit_summary(dom, k.replace('_', ' '), f)}" for k, f in m["fits"].items()]
    out += ["", md_table(HEAD, table_rows(mix))]
    out += [f"\nCaveat ({dom}): {c}" for dom, m in mix["domains"].items()
            if (c := caveat(mix, m["recommendation"]))]
    return "\n".join(out)


def replace_block(text: str, name: str, body: str) -> str:
    pat = re.compile(rf"(<!-- demo:{name} -->\n).*?(\n<!-- /demo:{name} -->)", re.S)
    if not pat.search(text):
        raise UsageError(f"README has no <!-- demo:{name} --> ... <!-- /demo:{name} --> block; "
                         "add the two marker lines where the block belongs")
    return pat.sub(lambda m: m.group(1) + body + m.group(2), text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("demo_out", type=Path, help="a `megatron-cpt demo --out` folder")
    p.add_argument("--readme", type=Path, default=Path("README.md"))
    args = p.parse_args(argv)
    report = args.demo_out / "study" / "report"
    if not (report / "results.json").is_file():
        raise SystemExit(f"{report / 'results.json'} not found; run `megatron-cpt demo` first")
    results = json.loads((report / "results.json").read_text())
    summary_path = args.demo_out / "demo_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    size = list(results["sizes"])[-1]
    image = args.readme.parent / IMAGE
    image.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(report / f"score_vs_compute_{size}.png", image)
    text = args.readme.read_text()
    text = replace_block(text, "picture", picture_block(results, IMAGE))
    text = replace_block(text, "table", table_block(results, summary))
    if (mixture := mixture_block(results)) is not None:
        text = replace_block(text, "mixture", mixture)
    args.readme.write_text(text)
    print(f"wrote the demo blocks of {args.readme} and {image} from {report / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
