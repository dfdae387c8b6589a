"""``megatron-cpt train``: compute-budgeted, resumable continued pretraining."""
from __future__ import annotations

import argparse
from pathlib import Path

from megatron_cpt.run_folder import EXIT_CODES


def register(sub, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=(
        "Continue pretraining a converted checkpoint under a compute budget. Start it with "
        "torchrun or srun (TP x PP x DP processes). The first launch loads model.pretrained; "
        "every later launch of the same run_dir resumes the checkpoint checkpoints/latest names "
        "(at any DP; at any TP/PP too when it was saved with checkpoint.optimizer_format="
        "fully_reshardable), and refuses (exit 2) when that one is missing, incomplete or not "
        "loadable at this layout. Exit codes: "
        + "; ".join(f"{e.code} {e.meaning}" for e in EXIT_CODES.values()) + "."))
    p.add_argument("--config", type=Path, required=True, help="training YAML (configs/train/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. optimizer.lr=1e-4 budget.tokens=2e9")
    p.add_argument("--force", action="store_true",
                   help="continue a run folder created by a different config with this one")
    p.add_argument("--check", action="store_true",
                   help="only validate the config, data and checkpoints and say what a launch "
                        "would do: fresh start, resume at N, or refuse and why "
                        "(no distributed init)")
    p.add_argument("--resume-from", metavar="iter_N",
                   help="resume this committed checkpoint of the run folder (name or iteration) "
                        "instead of the one checkpoints/latest names; latest is moved to it")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from megatron_cpt.training.config import TrainConfig

    cfg = TrainConfig.load(args.config, args.overrides)
    if args.check:
        from megatron_cpt.training import startup_record
        from megatron_cpt.training.preflight import prepare

        plan = prepare(cfg, force=args.force, resume_from=args.resume_from)
        print(f"ok: {plan.resume.describe()}; {plan.budget.iterations} iterations, DP={plan.dp}, "
              f"accumulation={plan.accumulation}, config hash {plan.config_hash}")
        print(startup_record.format_record(startup_record.build(cfg, plan.dtype)))  # this environment
        return 0
    from megatron_cpt.training.loop import train

    return train(cfg, force=args.force, resume_from=args.resume_from)
