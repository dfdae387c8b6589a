"""`report`: a study whose eval files cannot all be read."""
from __future__ import annotations

import json

from tests.bad_inputs import Ctx, Outcome, Row
from tests.test_report import write_run

TRUNCATED = "runs/1b/legal/eval/0000100.json"


def _study_with_a_truncated_eval(ctx: Ctx, *flags: str) -> list[str]:
    """One size, general + legal, three scored points each; one legal point's JSON cut short
    (a copy interrupted mid-file): once skipped with only a note inside report.md."""
    root = ctx.tmp / "study"
    acc = {"val": [0.3, 0.5, 0.6], "test": [0.3, 0.5, 0.6]}
    write_run(root / "runs/1b/general", [0, 1e15, 2e15], {"legal": acc},
              {"legal": [3.0, 2.9, 2.8]}, questions=False)
    write_run(root / "runs/1b/legal", [0, 1e15, 2e15], {"legal": acc},
              {"legal": [3.0, 2.6, 2.4]}, questions=False)
    cut = root / TRUNCATED
    cut.write_text(cut.read_text()[:40])
    return ["report", "--study", str(root), "--out", str(ctx.tmp / "out"), "--bootstrap", "0",
            *flags]


def _named_in_results(ctx: Ctx, _: Outcome) -> None:
    results = json.loads((ctx.tmp / "out" / "results.json").read_text())
    assert list(results["skipped"]) == [str(ctx.tmp / "study" / TRUNCATED)], results["skipped"]


ROWS = [
    Row("report-truncated-eval-strict", lambda ctx: _study_with_a_truncated_eval(ctx, "--strict"),
        (TRUNCATED, "unreadable", "--strict")),
    # without --strict the report is written, and the terminal names the file it left out
    Row("report-truncated-eval-named", _study_with_a_truncated_eval,
        ("warning: skipped 1 unreadable eval file", TRUNCATED), code=0,
        unchanged=lambda ctx: [ctx.tmp / "study"], check=_named_in_results),
]
