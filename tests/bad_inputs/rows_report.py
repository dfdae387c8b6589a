"""`report`: a study whose eval files cannot all be read; `--log-to` settings no tracker can
use, and a tracker that fails after the report is written."""
from __future__ import annotations

import json

from tests.bad_inputs import Ctx, Outcome, Row
from tests.test_report import write_run

TRUNCATED = "runs/1b/legal/eval/0000100.json"


def _study(ctx: Ctx, *flags: str) -> list[str]:
    """One size, general + legal, three scored points each."""
    root = ctx.tmp / "study"
    acc = {"val": [0.3, 0.5, 0.6], "test": [0.3, 0.5, 0.6]}
    write_run(root / "runs/1b/general", [0, 1e15, 2e15], {"legal": acc},
              {"legal": [3.0, 2.9, 2.8]}, questions=False)
    write_run(root / "runs/1b/legal", [0, 1e15, 2e15], {"legal": acc},
              {"legal": [3.0, 2.6, 2.4]}, questions=False)
    return ["report", "--study", str(root), "--out", str(ctx.tmp / "out"), "--bootstrap", "0",
            *flags]


def _study_with_a_truncated_eval(ctx: Ctx, *flags: str) -> list[str]:
    """One legal point's JSON cut short (a copy interrupted mid-file): once skipped with only a
    note inside report.md."""
    argv = _study(ctx, *flags)
    cut = ctx.tmp / "study" / TRUNCATED
    cut.write_text(cut.read_text()[:40])
    return argv


def _unusable_mlflow_store(ctx: Ctx, *flags: str) -> list[str]:
    """A file where the MLflow file store's folder should be: the tracker fails at runtime."""
    (ctx.tmp / "blocker").write_text("not a folder")
    return _study(ctx, "--log-to", "mlflow", "--mlflow-tracking-uri",
                  f"file://{ctx.tmp}/blocker/mlruns", *flags)


def _report_written(ctx: Ctx, _: Outcome) -> None:
    assert all((ctx.tmp / "out" / name).is_file() for name in ("report.md", "results.json"))


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
    Row("report-log-to-unknown-mlflow-scheme",
        lambda ctx: _study(ctx, "--log-to", "mlflow", "--mlflow-tracking-uri", "ftp://host/x"),
        ("MLflow tracking URI 'ftp://host/x': scheme unknown",)),
    Row("report-log-to-flag-without-its-tracker", lambda ctx: _study(ctx, "--wandb-project", "p"),
        ("--wandb-project needs --log-to wandb",)),
    # a tracker failing after the report is written: one warning, the report stays; --strict: 1
    Row("report-log-to-unusable-store", _unusable_mlflow_store,
        ("warning: logging to mlflow failed", "the report is in"), code=0,
        unchanged=lambda ctx: [ctx.tmp / "study"], check=_report_written),
    Row("report-log-to-unusable-store-strict", lambda ctx: _unusable_mlflow_store(ctx, "--strict"),
        ("warning: logging to mlflow failed",), code=1,
        unchanged=lambda ctx: [ctx.tmp / "study"], check=_report_written),
]
