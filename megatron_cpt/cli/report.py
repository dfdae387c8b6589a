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
                   "default it is skipped and named on stderr and in report.md's notes")
    p.add_argument("--forgetting-budget", **arg_range(float, 0, lo_open=True), default=None,
                   help="replay recommendation: largest allowed increase of general validation "
                   "loss over the base model, in nats (default: the study's "
                   "recommend.general_loss_increase, else 0.05)")
    p.add_argument("--target-domain-loss", **arg_range(float, 0, lo_open=True), default=None,
                   help="replay recommendation: domain validation loss to reach (default: the "
                   "pure domain run's predicted loss at the study's budget)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from megatron_cpt.errors import UsageError
    from megatron_cpt.report import build_report
    from megatron_cpt.report.render import summary_table

    if args.bootstrap < 0:
        raise UsageError(f"--bootstrap must be >= 0 (got {args.bootstrap})")
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
    return 0
