"""The ``megatron-cpt`` command: one subcommand per stage of the study.

Each stage module exposes ``register(subparsers)``, which adds its parser and sets
``func`` (called with the parsed namespace, returns an exit code).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from megatron_cpt.errors import Interrupted, UsageError

# (module, what it does) in pipeline order; modules are imported lazily per subcommand.
STAGES = {
    "prep": ("data_prep.cli", "prepare data: domain classifier, filtering, decontamination, tokenization"),
    "convert": ("megatron_cpt.cli.convert", "convert checkpoints (HF <-> Megatron) and verify conversions"),
    "train": ("megatron_cpt.cli.train", "continued pretraining under a compute budget (torchrun / srun)"),
    "plan": ("megatron_cpt.cli.plan", "print tokens, FLOPs, iterations, checkpoints and GPU-hours of a run or grid"),
    "launch": ("megatron_cpt.cli.launch", "SLURM: render sbatch scripts, submit the size x domain grid (submitit), status"),
    "eval": ("eval.cli", "evaluate: lm-eval tasks for exams, score checkpoints in place"),
    "report": ("megatron_cpt.cli.report", "study report: best checkpoints, SGER, forgetting, "
               "fits across sizes with bootstrap CIs"),
    "demo": ("megatron_cpt.cli.demo", "run the toy-scale demo on CPU"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-cpt",
        description="Continued pretraining of Qwen2.5 on Megatron-core for the domain "
        "specialization x model size study. Each subcommand is one stage; "
        "run `megatron-cpt <stage> --help` for its options.",
    )
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, (module, help_text) in STAGES.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        importlib.import_module(module).register(sub, name, help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stage = argv[0] if argv and argv[0] in STAGES else None
    try:
        args = build_parser(only=stage).parse_args(argv)  # options with a range raise UsageError
    except UsageError as exc:
        print(f"megatron-cpt {stage}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    try:
        return int(args.func(args) or 0)
    except (UsageError, Interrupted) as exc:
        print(f"megatron-cpt {args.stage}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # a stage without its own cleanup: still one line, not a traceback
        print(f"megatron-cpt {args.stage}: error: interrupted (SIGINT)", file=sys.stderr)
        return Interrupted.exit_code


if __name__ == "__main__":
    sys.exit(main())
