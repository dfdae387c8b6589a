"""``megatron-cpt plan``: what a run (or a whole study grid) costs, before launching it."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=(
        "Print tokens, FLOPs, iterations, checkpoint iterations and estimated GPU-hours of a "
        "training config (--config) or of every cell of a study grid (--grid). FLOPs per token "
        "follow Megatron-LM's formula (docs/training.md)."))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, help="training YAML")
    src.add_argument("--grid", type=Path, help="grid YAML: base config, sizes x domains")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides (--config)")
    p.add_argument("--model", help="architecture name or YAML when model.pretrained does not "
                   "exist yet (default: the checkpoint's model.yaml)")
    p.add_argument("--gpus", type=int, help="GPUs of the run (default: TP x PP)")
    p.add_argument("--mfu", type=float, default=0.40, help="assumed model FLOPs utilization")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="per-GPU dense bf16 peak (H100 SXM: 989)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_run)


def _model_for(cfg, name: str | None):
    from megatron_cpt.checkpoint import store
    from megatron_cpt.errors import UsageError
    from megatron_cpt.models.qwen2 import ModelConfig

    if name:
        from megatron_cpt.models.qwen2 import CONFIG_DIR

        # "qwen2.5-7b" has a Path suffix (".5-7b"), so resolve catalogue names here
        named = CONFIG_DIR / f"{name}.yaml"
        return ModelConfig.load(named if named.is_file() else name)
    if store.is_checkpoint(Path(cfg.model.pretrained)):
        return store.read_model_config(Path(cfg.model.pretrained))
    raise UsageError(f"model.pretrained {cfg.model.pretrained} is not a checkpoint yet; pass "
                     "--model NAME (e.g. qwen2.5-7b) to plan without it")


def plan_row(cfg, model, gpus: int | None, mfu: float, peak: float) -> dict:
    from megatron_cpt.training.budget import compute_budget, gpu_hours

    bud = compute_budget(model, cfg.data.seq_length, cfg.batch.global_batch_size,
                         tokens=cfg.budget.tokens, flops=cfg.budget.flops,
                         iterations=cfg.budget.iterations,
                         checkpoint_every_tokens=cfg.checkpoint.every_tokens,
                         save_at_end=cfg.checkpoint.save_at_end)
    gpus = gpus or cfg.parallel.tp * cfg.parallel.pp
    hours = gpu_hours(bud, gpus, peak, mfu)
    return {"model": model.name, "params": model.num_parameters(), "gpus": gpus,
            "seq_length": cfg.data.seq_length, "global_batch_size": cfg.batch.global_batch_size,
            "flops_per_token": bud.flops_per_token, "iterations": bud.iterations,
            "tokens": bud.tokens, "flops": bud.flops, "checkpoints": len(bud.checkpoint_iterations),
            "checkpoint_every_iters": bud.checkpoint_every_iters, "gpu_hours": hours,
            "wall_hours": hours / gpus, "mfu": mfu}


def _grid_rows(path: Path, args) -> list[dict]:
    import yaml

    from megatron_cpt.errors import UsageError
    from megatron_cpt.training.config import TrainConfig

    if not path.is_file():
        raise UsageError(f"grid file {path} not found")
    grid = yaml.safe_load(path.read_text()) or {}
    if "base" not in grid or "sizes" not in grid:
        raise UsageError(f"{path}: a grid needs `base:` (training YAML) and `sizes:`")
    rows = []
    domains = grid.get("domains") or ["run"]
    for size, spec in grid["sizes"].items():
        spec = spec or {}
        overrides = list(spec.get("overrides", []))
        overrides += [f"budget.{k}={v}" for k, v in (grid.get("budget") or {}).items()]
        cfg = TrainConfig.load(path.parent / grid["base"], overrides)
        model = _model_for(cfg, spec.get("model", size))
        for dom in domains:
            row = plan_row(cfg, model, spec.get("gpus"), args.mfu, args.peak_tflops)
            rows.append({"cell": f"{size}/{dom}", **row})
    return rows


def _run(args: argparse.Namespace) -> int:
    from megatron_cpt.training.config import TrainConfig

    if args.grid:
        rows = _grid_rows(args.grid, args)
    else:
        cfg = TrainConfig.load(args.config, args.overrides)
        rows = [{"cell": Path(cfg.run_dir).name,
                 **plan_row(cfg, _model_for(cfg, args.model), args.gpus, args.mfu, args.peak_tflops)}]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    head = f"{'cell':<28} {'params':>9} {'gpus':>4} {'tokens':>10} {'FLOPs':>10} {'iters':>8} " \
           f"{'ckpts':>5} {'GPU-h':>9} {'wall-h':>7}"
    print(head)
    for r in rows:
        print(f"{r['cell']:<28} {r['params'] / 1e9:>8.2f}B {r['gpus']:>4} {r['tokens']:>10.3e} "
              f"{r['flops']:>10.3e} {r['iterations']:>8} {r['checkpoints']:>5} "
              f"{r['gpu_hours']:>9.1f} {r['wall_hours']:>7.2f}")
    total = sum(r["gpu_hours"] for r in rows)
    print(f"total: {total:.1f} GPU-hours at MFU {args.mfu:.2f} of {args.peak_tflops:.0f} TFLOP/s")
    return 0
