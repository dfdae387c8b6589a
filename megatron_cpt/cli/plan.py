"""``megatron-cpt plan``: what a run (or the whole study grid) costs, before launching it.

``plan --study`` and ``launch grid --dry-run`` are one planner: both print
:func:`print_study_plan` over :func:`megatron_cpt.launch.grid.cost_rows` of the study YAML.
``plan --config`` first runs ``train --check``'s layout check (``preflight.check_layout``), so
it never prices a layout ``train`` refuses."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from megatron_cpt.config_ranges import arg_range


def register(sub, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=(
        "Print tokens, FLOPs, iterations, checkpoint iterations and estimated GPU-hours of a "
        "training config (--config) or of every cell of the study grid (--study, the same table "
        "as `launch grid --dry-run`), with memory per GPU (weights, gradients, optimizer shard, "
        "activations) and checkpoint storage. FLOPs per token follow Megatron-LM's formula "
        "(docs/training.md). A layout `train --check` refuses on --gpus GPUs is refused here "
        "too (exit 2, the same line)."))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, help="training YAML")
    src.add_argument("--study", type=Path, help="study YAML (configs/study.yaml): every cell")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides (--config)")
    p.add_argument("--sizes", nargs="+", help="--study: subset of the study's sizes")
    p.add_argument("--domains", nargs="+", help="--study: subset of the corpora")
    p.add_argument("--model", help="architecture name or YAML when model.pretrained does not "
                   "exist yet (default: the checkpoint's model.yaml)")
    p.add_argument("--gpus", **arg_range(int, 1), help="GPUs of the run (default: TP x PP)")
    p.add_argument("--mfu", **arg_range(float, 0, 1, lo_open=True), default=0.40, help="assumed model FLOPs utilization")
    p.add_argument("--peak-tflops", **arg_range(float, 0, lo_open=True), default=989.0,
                   help="per-GPU dense bf16 peak (H100 SXM: 989)")
    p.add_argument("--gpu-memory-gb", **arg_range(float, 0, lo_open=True),
                   help="--config: GiB per GPU to check the memory plan against (--study: "
                   "resources.gpu_memory_gb)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    r = p.add_argument_group("replay recommendation (--recommend)")
    r.add_argument("--recommend", action="store_true",
                   help="with --study FOLDER (a finished study's folder, or its YAML): fit the "
                   "mixture law and print the replay recommendation per size, the same table "
                   "as report.md")
    r.add_argument("--forgetting-budget", **arg_range(float, 0, lo_open=True), default=None,
                   help="general validation loss increase allowed over the base model, nats "
                   "(default: the study's recommend.general_loss_increase, else 0.05)")
    r.add_argument("--target-domain-loss", **arg_range(float, 0, lo_open=True), default=None,
                   help="domain validation loss to reach (default: the pure domain run's)")
    r.add_argument("--bootstrap", **arg_range(int, 0), default=200,
                   help="bootstrap refits over cells (at most 200)")
    r.add_argument("--seed", **arg_range(int, 0), default=0, help="bootstrap seed")
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


def _config_memory(cfg, model, gpus: int | None, gpu_memory_gb: float | None) -> dict:
    """The memory plan of one config on ``gpus`` GPUs (default TP x PP; dtype auto = bf16)."""
    from megatron_cpt.training import memory

    dtype = "bfloat16" if cfg.precision.dtype == "auto" else cfg.precision.dtype
    lay = memory.Layout.from_config(cfg, gpus or cfg.parallel.tp * cfg.parallel.pp, dtype)
    return memory.estimate(model, lay, gpu_memory_gb).to_dict()


def print_study_plan(study, cells, mfu: float, peak_tflops: float, as_json: bool = False) -> int:
    """The grid's cells with resources, tokens, FLOPs and GPU-hours; submits nothing."""
    from megatron_cpt.launch.capacity import print_capacity
    from megatron_cpt.launch.grid import cost_rows

    rows = cost_rows(cells, mfu, peak_tflops)
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'cell':<24} {'model':<14} {'TPxPP':>6} {'nodes':>5} {'ranks':>5} {'time':>11} "
          f"{'tokens':>10} {'FLOPs':>10} {'iters':>7} {'GPU-h':>8} {'GiB/GPU':>8}  inputs")
    for r in rows:
        print(f"{r['size'] + '/' + r['cell']:<24} {r['model']:<14} {r['tp']}x{r['pp']:<4} "
              f"{r['nodes']:>5} {r['tasks']:>5} {r['time']:>11} {r['tokens']:>10.3e} "
              f"{r['flops']:>10.3e} {r['iterations']:>7} {r['gpu_hours']:>8.1f} "
              f"{r['memory']['total_gib']:>7.1f}{'!' if not r['fits'] else ' '}  "
              f"{'missing' if r['inputs'] else 'ready'}")
    for r in rows:
        if r["inputs"]:
            print(f"missing: {r['inputs']}")
    print_capacity(study, rows)
    print(f"total: {sum(r['gpu_hours'] for r in rows):.1f} GPU-hours at MFU {mfu:.2f}; "
          f"runs under {study.study_dir}; nothing submitted")
    return 0


def _recommend(args: argparse.Namespace) -> int:
    """The report's replay recommendation table, from a finished study folder."""
    from megatron_cpt.errors import UsageError
    from megatron_cpt.report.load import load_study
    from megatron_cpt.report.mixture import analyze_mixture
    from megatron_cpt.report.mixture_text import terminal_lines

    if not args.study:
        raise UsageError("--recommend reads a finished study: pass --study STUDY_FOLDER")
    folder = args.study
    if folder.is_file():  # the study YAML: its study_dir
        from megatron_cpt.launch.study import StudyConfig

        folder = StudyConfig.load(folder).study_dir
    mix = analyze_mixture(load_study(folder), args.forgetting_budget, args.target_domain_loss,
                          args.bootstrap, args.seed)
    if args.json:
        print(json.dumps(mix, indent=2, default=float))
        return 0
    if not mix["domains"]:
        raise UsageError(f"{folder} has no replay cells (declare `replay:` in the study YAML)")
    print("\n".join(terminal_lines(mix)))
    return 0


def _run(args: argparse.Namespace) -> int:
    from megatron_cpt.training.budget import cost_estimate
    from megatron_cpt.training.config import TrainConfig
    from megatron_cpt.training.preflight import check_layout

    if args.recommend:
        return _recommend(args)
    if args.study:
        from megatron_cpt.launch.study import StudyConfig

        study = StudyConfig.load(args.study)
        return print_study_plan(study, study.cells(args.sizes, args.domains), args.mfu,
                                args.peak_tflops, args.json)
    cfg = TrainConfig.load(args.config, args.overrides)
    model = _model_for(cfg, args.model)
    check_layout(cfg, model, args.gpus or cfg.parallel.tp * cfg.parallel.pp)  # as `train --check`
    rows = [{"cell": Path(cfg.run_dir).name, **cost_estimate(
        cfg, model, args.gpus, args.mfu, args.peak_tflops),
        "memory": _config_memory(cfg, model, args.gpus, args.gpu_memory_gb)}]
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
    for r in rows:
        mem = r["memory"]
        print(f"memory per GPU (GiB): weights {mem['weights_gib']}, gradients "
              f"{mem['gradients_gib']}, optimizer {mem['optimizer_gib']}, activations "
              f"{mem['activations_gib']}, total {mem['total_gib']}"
              + (f" of {mem['usable_gib']} usable: {'fits' if mem['fits'] else 'DOES NOT FIT'}"
                 if mem["usable_gib"] is not None else ""))
    total = sum(r["gpu_hours"] for r in rows)
    print(f"total: {total:.1f} GPU-hours at MFU {args.mfu:.2f} of {args.peak_tflops:.0f} TFLOP/s")
    return 0
