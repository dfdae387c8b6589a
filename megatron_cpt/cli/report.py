"""``megatron-cpt report``: read every run's evaluations of a study grid, write the report."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_cpt.config_ranges import arg_range


def register(sub, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=(
        "Read STUDY/runs/<size>/<cell>/eval/*.json (and study.json when present) and write "
        "report.md, report.html, results.json and PNG plots: best checkpoints (selected on "
        "val), SGER, forgetting and domain loss at equal compute, power-law fits across sizes "
        "with bootstrap CIs over exam questions. Definitions: docs/report.md."))
    p.add_argument("--study", type=Path, required=True, help="study folder")
    p.add_argument("--out", type=Path, help="output folder (default STUDY/report)")
    p.add_argument("--bootstrap", **arg_range(int, 0), default=1000,
                   help="bootstrap replicates over exam questions (0: no CIs)")
    p.add_argument("--seed", **arg_range(int, 0), default=0, help="bootstrap seed")
    p.add_argument("--strict", action="store_true",
                   help="fail (exit 2, nothing written) when an eval file cannot be read; by "
                   "default it is skipped and named on stderr and in report.md's notes. With "
                   "--log-to: exit 1 when a tracker fails (the report is written either way)")
    p.add_argument("--forgetting-budget", **arg_range(float, 0, lo_open=True), default=None,
                   help="replay recommendation: largest allowed increase of general validation "
                   "loss over the base model, in nats (default: the study's "
                   "recommend.general_loss_increase, else 0.05)")
    p.add_argument("--target-domain-loss", **arg_range(float, 0, lo_open=True), default=None,
                   help="replay recommendation: domain validation loss to reach (default: the "
                   "pure domain run's predicted loss at the study's budget)")
    _register_tracking(p)
    p.set_defaults(func=_run)


def _register_tracking(p: argparse.ArgumentParser) -> None:
    """--log-to and where to: each setting defaults to the study's runs' logging.<backend>
    section, then the environment, then the study name (group, experiment)."""
    g = p.add_argument_group("experiment tracking", "log the written report (summary table, "
                             "files, plots, SGER and fit exponents) as one run named 'report' "
                             "(tag kind=report) beside the study's runs; docs/report.md")
    g.add_argument("--log-to", action="append", choices=("wandb", "mlflow"), default=[],
                   help="tracker to log the report to (repeat for both)")
    g.add_argument("--wandb-project", help="W&B project (default: the runs' "
                   "logging.wandb.project, else $WANDB_PROJECT)")
    g.add_argument("--wandb-entity", help="W&B entity (default: the runs', else $WANDB_ENTITY)")
    g.add_argument("--wandb-group", help="W&B group (default: the runs', else the study name)")
    g.add_argument("--wandb-mode", choices=("online", "offline"),
                   help="W&B mode (default: the runs', else online); offline: sync later")
    g.add_argument("--mlflow-tracking-uri", help="MLflow tracking URI, e.g. file:///abs/mlruns "
                   "(default: the runs' logging.mlflow.tracking_uri, else $MLFLOW_TRACKING_URI)")
    g.add_argument("--mlflow-experiment", help="MLflow experiment (default: the runs', else "
                   "the study name)")


def _run(args: argparse.Namespace) -> int:
    from megatron_cpt.errors import UsageError
    from megatron_cpt.report import build_report
    from megatron_cpt.report.render import summary_table

    if args.bootstrap < 0:
        raise UsageError(f"--bootstrap must be >= 0 (got {args.bootstrap})")
    targets = _tracking_targets(args)  # bad settings: exit 2 before any work
    out = args.out or args.study / "report"
    results = build_report(args.study, out, bootstrap=args.bootstrap, seed=args.seed,
                           strict=args.strict, forgetting_budget=args.forgetting_budget,
                           target_domain_loss=args.target_domain_loss)
    if results["skipped"]:  # a skipped point moves SGER and the fits: say so where it is seen
        print(f"megatron-cpt report: warning: skipped {len(results['skipped'])} unreadable eval "
              f"file(s) (--strict refuses them): {', '.join(results['skipped'])}", file=sys.stderr)
    print(out / "report.md")
    print(summary_table(results))
    if results["missing"]:
        print(f"missing: {len(results['missing'])} (listed in report.md)")
    return _log_report(results, out, targets, args.strict)


def _tracking_targets(args: argparse.Namespace) -> dict:
    """The settings of each --log-to tracker ({} without --log-to); UsageError when wrong."""
    import dataclasses

    from megatron_cpt.report.load import study_runs
    from megatron_cpt.report.tracking import SECTIONS, sections

    given = {b: {f.name: getattr(args, f"{b}_{f.name}") for f in dataclasses.fields(cls)}
             for b, cls in SECTIONS.items()}
    if not args.log_to and not any(v for values in given.values() for v in values.values()):
        return {}
    return sections(args.log_to, given, *study_runs(args.study))


def _log_report(results: dict, out: Path, targets: dict, strict: bool) -> int:
    """Log the written report; a tracker that fails is a warning (exit 1 with --strict)."""
    if not targets:
        return 0
    from megatron_cpt.report.tracking import log_report

    failed = log_report(results, out, targets, warn=lambda line: print(
        f"megatron-cpt report: warning: {line}", file=sys.stderr))
    return 1 if failed and strict else 0
