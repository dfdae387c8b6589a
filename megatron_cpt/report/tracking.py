"""``report --log-to wandb|mlflow``: the finished report as one tracked run beside the study's
cells.

Why a run of its own: the cells' runs hold the curves; the report is what they add up to
(summary table, SGER, fits, plots). So it lands in the same W&B group / MLflow experiment as
the cells (the grid names both after the study) as one run named ``report`` tagged
``kind=report``, through the training backends (training/tracking.py). Its id comes from the
report folder, so re-running the report updates that run instead of adding another.

Settings, key by key: the command line, else the ``logging.<backend>`` section of the first
run of the study that turns the tracker on, else the environment (``WANDB_PROJECT``,
``WANDB_ENTITY``, ``MLFLOW_TRACKING_URI``), else the study name (W&B group, MLflow
experiment). They are checked before the report is built (UsageError, exit 2); a tracker that
fails while logging is one warning, after the report files are written.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
from pathlib import Path
from typing import Callable

from megatron_cpt.errors import UsageError
from megatron_cpt.report.render import REPORT_FILES, SUMMARY_HEAD, summary_rows
from megatron_cpt.run_folder import RunFolder
from megatron_cpt.training.config import TRACKING_SCHEMES, WANDB_MODES, MlflowSection, WandbSection
from megatron_cpt.training.tracking import BACKENDS, RunInfo

Section = WandbSection | MlflowSection
SECTIONS: dict[str, type] = {"wandb": WandbSection, "mlflow": MlflowSection}
REQUIRED = {"wandb": "project", "mlflow": "tracking_uri"}  # the key that turns a tracker on
ENV = {("wandb", "project"): "WANDB_PROJECT", ("wandb", "entity"): "WANDB_ENTITY",
       ("mlflow", "tracking_uri"): "MLFLOW_TRACKING_URI"}
STUDY_NAMED = {("wandb", "group"), ("mlflow", "experiment")}  # default: the study's name
HEADLINE = ("sger", "sger_control", "sger_domain_loss")


def flag(backend: str, key: str) -> str:
    """The command-line option of a setting: ``--wandb-project``, ``--mlflow-tracking-uri``."""
    return f"--{backend}-{key.replace('_', '-')}"


def sections(log_to: list[str], given: dict[str, dict], study: str,
             run_dirs: list[Path]) -> dict[str, Section]:
    """The settings of each tracker in ``log_to`` (``given``: the command line's values, None
    where not given). UsageError for a setting given without its tracker or one missing."""
    for backend, values in given.items():
        stray = [k for k, v in values.items() if v is not None and backend not in log_to]
        if stray:
            raise UsageError(f"{flag(backend, stray[0])} needs --log-to {backend}")
    out: dict[str, Section] = {}
    for backend in dict.fromkeys(log_to):
        configured = _configured(backend, run_dirs)
        values = {}
        for f in dataclasses.fields(SECTIONS[backend]):
            key = (backend, f.name)
            values[f.name] = (given.get(backend, {}).get(f.name) or configured.get(f.name)
                              or os.environ.get(ENV.get(key, "")) or
                              (study if key in STUDY_NAMED else None))
        out[backend] = _checked(backend, SECTIONS[backend](
            **{k: v for k, v in values.items() if v}))
    return out


def _configured(backend: str, run_dirs: list[Path]) -> dict:
    """``logging.<backend>`` of the first run of the study that turns the tracker on ({}:
    none does), so the report lands where the cells' runs are."""
    for run_dir in run_dirs:
        run = RunFolder(run_dir)
        if not run.config_path.is_file():
            continue
        try:
            section = run.config_dict().get("logging", {}).get(backend) or {}
        except Exception:  # noqa: BLE001 - a config.yaml that cannot be read sets nothing
            continue
        if isinstance(section, dict) and section.get(REQUIRED[backend]):
            return section
    return {}


def _checked(backend: str, section: Section) -> Section:
    """Refuse what no tracker can use: a missing project / URI, an unknown mode or scheme."""
    key = REQUIRED[backend]
    if not getattr(section, key):
        env = ENV[(backend, key)]
        raise UsageError(f"--log-to {backend} needs {flag(backend, key)}: no run of the study "
                         f"sets logging.{backend}.{key} and {env} is not set")
    if backend == "wandb" and section.mode not in WANDB_MODES:
        raise UsageError(f"W&B mode {section.mode!r} unknown; choose online or offline")
    uri = getattr(section, "tracking_uri", "")
    if uri and ":" in uri and uri.split(":", 1)[0] not in TRACKING_SCHEMES:
        raise UsageError(f"MLflow tracking URI {uri!r}: scheme unknown; use "
                         f"{', '.join(s + ':' for s in TRACKING_SCHEMES)} or a path")
    return section


def headline(results: dict) -> dict[str, float]:
    """The numbers a reader compares across studies, as tracker keys: per cell
    ``sger/<size>/<domain>`` (and ``sger_control``, ``sger_domain_loss``) and
    ``best_test_acc/<size>/<domain>`` (the specialized run's val-selected checkpoint), per
    domain ``fit_exponent/<domain>/<quantity>`` (b of y = a N^b). Undefined values are left out."""
    out: dict[str, float] = {}
    for key, cell in results["cells"].items():
        for name in HEADLINE:
            out[f"{name}/{key}"] = (cell.get(name) or {}).get("value")
        out[f"best_test_acc/{key}"] = ((cell.get("best") or {}).get("specialized") or {}).get(
            "test_acc")
    for domain, fits in (results.get("fits") or {}).items():
        for quantity, fit in fits.items():
            if isinstance(fit, dict):
                out[f"fit_exponent/{domain}/{quantity}"] = fit.get("b")
    return {k: float(v) for k, v in out.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def report_files(results: dict, out: Path) -> list[Path]:
    """report.md, report.html, results.json and every plot, as written in ``out``."""
    return [out / name for name in REPORT_FILES.values()] + [out / p for p in results["plots"]]


def report_run(results: dict, out: Path) -> RunInfo:
    """The tracked run of the report in ``out``: same id for every re-run into that folder."""
    study = results["study"]
    slug = re.sub(r"[^A-Za-z0-9_-]", "-", study)[:40] or "study"
    digest = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:12]
    return RunInfo(run_id=f"report-{slug}-{digest}", name="report", group=study,
                   tags={"study": study, "kind": "report"},
                   config={"study": study, "study_dir": results.get("study_dir"),
                           "report_dir": str(out), "bootstrap": results.get("bootstrap")},
                   run_dir=out)


def log_report(results: dict, out: Path, targets: dict[str, Section],
               warn: Callable[[str], None]) -> list[str]:
    """Log the written report to each tracker; the names of those that failed (one ``warn``
    line each: the report files are on disk whatever a tracker does)."""
    out, failed = Path(out), []
    info = report_run(results, out)
    for name, section in targets.items():
        try:
            _log_to(BACKENDS[name](section, info), results, out)
        except Exception as exc:  # noqa: BLE001 - an import error, a dead server, a bad store
            failed.append(name)
            lines = str(exc).strip().splitlines()
            why = f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]
            warn(f"logging to {name} failed ({why}); the report is in {out} only")
    return failed


def _log_to(backend, results: dict, out: Path) -> None:
    """Table, files and headline numbers into one opened backend, then close it (as failed
    when a step raised, and re-raise)."""
    try:
        backend.log_table("summary_table", SUMMARY_HEAD, summary_rows(results))
        backend.log_files(f"report-{results['study']}", "report", report_files(results, out))
        if vals := headline(results):
            backend.log_summary(vals)
    except BaseException:
        try:
            backend.close(1)
        except Exception:  # noqa: BLE001 - the first error is the one to report
            pass
        raise
    backend.close(0)
