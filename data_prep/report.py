"""One report per ``prep filter`` run: ``prep_report.json``, ``prep_report.md`` and ``funnel.png``.

The funnel lists every stage in the order documents meet it (read, dedup, language, each
quality rule, decontamination) with the documents and UTF-8 bytes that enter it and the
drops by reason; ``documents in = documents out + dropped`` holds for every row. Throughput is
documents per CPU-second of each stage (each task runs on one core, so that is documents/s
per core).
"""
from __future__ import annotations

import json
import os

from data_prep.quality import RULES

STAGE_OF = {"duplicate_exact": "dedup", "near_duplicate": "dedup", "language": "language",
            "contaminated": "decontaminate", **{r: r for r in RULES}}
ORDER = ["read", "dedup", "language", *RULES, "decontaminate"]


def _add(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict):
            _add(dst.setdefault(k, {}), v)
        else:
            dst[k] = dst.get(k, 0) + v


def pipeline_section(cfg, shard_stats: list[dict], dedup: dict | None) -> dict:
    """The report keys this module adds to the filter report: funnel, languages, dedup, throughput."""
    gate: dict = {}
    for st in shard_stats:
        _add(gate, st["gate"])
    clean_bytes = sum(st["clean_bytes"] for st in shard_stats)
    stages = gate.get("stages", {})
    if dedup:
        stages.setdefault("dedup", {"documents": 0, "bytes": 0})["seconds"] = dedup["signature_seconds"]
    throughput = {name: {"documents": s["documents"], "cpu_seconds": round(s["seconds"], 4),
                         "documents_per_s_per_core": round(s["documents"] / s["seconds"], 1) if s["seconds"] else None,
                         "mb_per_s_per_core": round(s["bytes"] / 1e6 / s["seconds"], 3) if s["seconds"] else None}
                  for name, s in stages.items()}
    section = {"languages": dict(sorted(gate.get("languages", {}).items(), key=lambda kv: -kv[1])),
               "throughput": throughput, "dropped_bytes": gate.get("dropped_bytes", {}),
               "clean_bytes": clean_bytes,
               "stages_enabled": {"dedup": {"exact": cfg.dedup.exact, "near": cfg.dedup.near},
                                  "language": cfg.language.code, "quality": cfg.quality.enabled()}}
    if dedup:
        section["dedup"] = {k: dedup[k] for k in ("config", "documents", "removed", "clusters")}
    return section


def funnel(report: dict) -> list[dict]:
    """Rows of (stage, documents in, bytes in, dropped, documents out, drop reasons)."""
    by_stage: dict[str, dict] = {}
    for reason, n in report["dropped"].items():
        by_stage.setdefault(STAGE_OF.get(reason, "read"), {})[reason] = n
    bytes_in = report["clean_bytes"] + sum(report["dropped_bytes"].values())
    docs = report["documents_in"]
    rows = []
    for stage in ORDER:
        reasons = by_stage.get(stage, {})
        if stage != "read" and stage not in report["throughput"] and not reasons:
            continue
        dropped = sum(reasons.values())
        rows.append({"stage": stage, "documents_in": docs, "bytes_in": bytes_in if stage != "read" else None,
                     "dropped": dropped, "documents_out": docs - dropped, "reasons": reasons})
        docs -= dropped
        if stage != "read":
            bytes_in -= sum(report["dropped_bytes"].get(r, 0) for r in reasons)
    return rows


def decontamination_hits(report: dict) -> list[dict]:
    counts: dict[tuple, int] = {}
    for r in report["decontamination"]["removed"]:
        key = (os.path.basename(r.get("exam", "?")), r.get("split", "-"))
        counts[key] = counts.get(key, 0) + 1
    return [{"exam": e, "split": s, "documents_removed": n} for (e, s), n in sorted(counts.items())]


def write(out_dir: str, report: dict) -> dict:
    """Write prep_report.{json,md} and funnel.png next to the outputs; returns the JSON written."""
    full = {"funnel": funnel(report), "decontamination_hits": decontamination_hits(report), **report}
    with open(os.path.join(out_dir, "prep_report.json"), "w") as fh:
        json.dump(full, fh, indent=2)
    _plot(full["funnel"], os.path.join(out_dir, "funnel.png"))
    with open(os.path.join(out_dir, "prep_report.md"), "w") as fh:
        fh.write(markdown(full))
    return full


def _table(rows: list[dict], cols: list[str]) -> list[str]:
    fmt = lambda v: "" if v is None else (f"{v:,}" if isinstance(v, int) else str(v))  # noqa: E731
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
            *["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]]


def markdown(full: dict) -> str:
    lines = ["# Data preparation report", "",
             f"{full['documents_in']:,} documents in, {full['documents_clean']:,} kept "
             f"({full['clean_bytes']:,} bytes); stages: {json.dumps(full['stages_enabled'])}.", "",
             "## Funnel", "", "![funnel](funnel.png)", ""]
    funnel_rows = [{**r, "reasons": ", ".join(f"{k}={v}" for k, v in r["reasons"].items())} for r in full["funnel"]]
    lines += _table(funnel_rows, ["stage", "documents_in", "bytes_in", "dropped", "documents_out", "reasons"])
    outs = [{"output": k, **v} for k, v in full["outputs"].items()]
    lines += ["", f"## Outputs (tokens: {full['token_unit']})", "",
              *_table(outs, ["output", "documents", "tokens", "threshold", "token_target"])]
    if full.get("languages"):
        lines += ["", "## Languages (documents reaching language identification)", "",
                  *_table([{"language": k, "documents": v} for k, v in full["languages"].items()],
                          ["language", "documents"])]
    if full.get("dedup"):
        d = full["dedup"]
        lines += ["", f"## Deduplication ({d['clusters']['count']} clusters with removals)", ""]
        for c in d["clusters"]["examples"]:
            lines.append(f"- kept `{c['kept']}`, removed " + ", ".join(f"`{r['id']}` ({r['reason']})"
                                                                      for r in c["removed"]))
    lines += ["", "## Decontamination hits per exam and split", "",
              *_table(full["decontamination_hits"], ["exam", "split", "documents_removed"]),
              "", "## Throughput (documents per CPU-second = per core)", "",
              *_table([{"stage": k, **v} for k, v in full["throughput"].items()],
                      ["stage", "documents", "cpu_seconds", "documents_per_s_per_core", "mb_per_s_per_core"])]
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 0.45 * len(rows) + 1.2))
    names = [r["stage"] for r in rows][::-1]
    ax.barh(names, [r["documents_out"] for r in rows][::-1], color="#4C72B0", label="kept")
    ax.barh(names, [r["dropped"] for r in rows][::-1], left=[r["documents_out"] for r in rows][::-1],
            color="#DD8452", label="dropped")
    ax.set_xlabel("documents")
    ax.set_title("data preparation funnel")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
