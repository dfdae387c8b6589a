"""``megatron-cpt launch``: sbatch scripts, the submitit grid and its status."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_cpt.config_ranges import arg_range

DEFAULT_STUDY = Path("configs/study.yaml")


def register(sub, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=(
        "Launch the size x domain study on SLURM. `render-sbatch` writes one sbatch script per "
        "cell (committed under slurm/), `grid` submits every cell through submitit (one job "
        "array per size, evaluation chained afterok, automatic requeue), `status` prints one "
        "row per cell. Every input is checked before anything is submitted (exit 2)."))
    lsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    r = lsub.add_parser("render-sbatch", help="write slurm/cpt_<size>_<corpus>.sh for every cell")
    r.add_argument("--study", type=Path, default=DEFAULT_STUDY, help="study YAML (configs/study.yaml)")
    r.add_argument("--out", type=Path, default=Path("slurm"), help="folder for the scripts")
    r.add_argument("--skip-refused", action="store_true",
                   help="write the cells that fit and name the refused ones (default: a refused "
                   "cell writes nothing, exit 2)")
    r.set_defaults(func=_render)

    g = lsub.add_parser("grid", help="submit the grid (submitit): arrays per size, eval afterok")
    g.add_argument("--study", type=Path, default=DEFAULT_STUDY)
    g.add_argument("--sizes", nargs="+", help="subset of the study's sizes (default: all)")
    g.add_argument("--domains", nargs="+", help="subset of the corpora: general, <domain>, "
                   "control_<domain> (default: all)")
    g.add_argument("--executor", choices=["slurm", "local"], default="slurm",
                   help="slurm (default) or local: run the cells one after another here")
    g.add_argument("--no-eval", action="store_true", help="do not chain the evaluation jobs")
    g.add_argument("--dry-run", action="store_true",
                   help="print cells, resources, tokens, FLOPs and GPU-hours; submit nothing")
    g.add_argument("--mfu", **arg_range(float, 0, 1, lo_open=True), default=0.40, help="--dry-run: assumed MFU")
    g.add_argument("--peak-tflops", **arg_range(float, 0, lo_open=True), default=989.0, help="--dry-run: per-GPU peak")
    g.set_defaults(func=_grid)

    s = lsub.add_parser("status", help="one row per cell: state, progress, checkpoint, loss, requeues, "
                          "crashes/retries")
    s.add_argument("--study", type=Path, default=DEFAULT_STUDY)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_status)


def _render(args: argparse.Namespace) -> int:
    from megatron_cpt.errors import UsageError
    from megatron_cpt.launch.sbatch import render_cells, write_scripts
    from megatron_cpt.launch.study import StudyConfig

    study = StudyConfig.load(args.study, use_env=False)
    rendering = render_cells(study)
    if rendering.refused and not args.skip_refused:
        raise UsageError(rendering.refusal())
    written = write_scripts(rendering.scripts, args.out)
    print(f"wrote {len(written)} scripts to {args.out}/: " + " ".join(p.name for p in written))
    by_reason: dict[str, list[str]] = {}
    for name, reason in rendering.refused.items():
        by_reason.setdefault(reason, []).append(name)
    for reason, names in by_reason.items():  # --skip-refused: say what is not there, and why
        print(f"megatron-cpt launch: warning: skipped {len(names)} refused cell(s) "
              f"{' '.join(names)}: {reason}", file=sys.stderr)
    return 0


def _grid(args: argparse.Namespace) -> int:
    from megatron_cpt.launch.grid import submit_grid
    from megatron_cpt.launch.study import StudyConfig

    study = StudyConfig.load(args.study)
    cells = study.cells(args.sizes, args.domains)
    if args.dry_run:  # the same planner as `megatron-cpt plan --study`
        from megatron_cpt.cli.plan import print_study_plan

        return print_study_plan(study, cells, args.mfu, args.peak_tflops)
    submit_grid(study, cells, kind=args.executor, evaluate=not args.no_eval)
    print(f"study folder: {study.study_dir}  (megatron-cpt launch status --study {args.study})")
    return 0


def _status(args: argparse.Namespace) -> int:
    from megatron_cpt.launch.status import format_rows, status_rows
    from megatron_cpt.launch.study import StudyConfig

    study = StudyConfig.load(args.study)
    rows = status_rows(study, study.cells())
    print(json.dumps(rows, indent=2) if args.json else format_rows(rows))
    return 0
