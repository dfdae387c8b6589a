"""``megatron-cpt train``: compute-budgeted, resumable continued pretraining."""
from __future__ import annotations

import argparse
from pathlib import Path

from megatron_cpt.run_folder import EXIT_CODES


def register(sub, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=(
        "Continue pretraining a converted checkpoint under a compute budget. Start it with "
        "torchrun or srun (TP x PP x DP processes). The first launch loads model.pretrained; "
        "every later launch of the same run_dir resumes its latest checkpoint. Exit codes: "
        + "; ".join(f"{e.code} {e.meaning}" for e in EXIT_CODES.values()) + "."))
    p.add_argument("--config", type=Path, required=True, help="training YAML (configs/train/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. optimizer.lr=1e-4 budget.tokens=2e9")
    p.add_argument("--force", action="store_true",
                   help="continue a run folder created by a different config with this one")
    p.add_argument("--check", action="store_true",
                   help="only validate the config, data and checkpoint (no distributed init)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from megatron_cpt.training.config import TrainConfig

    cfg = TrainConfig.load(args.config, args.overrides)
    if args.check:
        from megatron_cpt.training.preflight import prepare

        plan = prepare(cfg, force=args.force)
        print(f"ok: {plan.budget.iterations} iterations, DP={plan.dp}, "
              f"accumulation={plan.accumulation}, config hash {plan.config_hash}")
        return 0
    from megatron_cpt.training.loop import train

    return train(cfg, force=args.force)
