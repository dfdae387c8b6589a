"""What the study's cells need beyond GPU-hours: memory per GPU (refused before submission
when a cell cannot fit), checkpoint storage before/after weights-only evaluation checkpoints,
and how many epochs of each corpus the budget implies. The arithmetic is
:mod:`megatron_cpt.training.memory`; this module applies it to study cells and prints it for
``plan --study`` and ``launch grid --dry-run``."""
from __future__ import annotations

from pathlib import Path

from megatron_cpt.errors import UsageError
from megatron_cpt.launch.study import Cell, StudyConfig
from megatron_cpt.training import memory

TIB = 1024 ** 4


def cell_dtype(cell: Cell, cfg) -> str:
    """The training dtype on the study's machines (``auto``: bf16 on GPUs, fp32 on CPUs)."""
    if cfg.precision.dtype != "auto":
        return cfg.precision.dtype
    return "bfloat16" if cell.study.resources.gpus_per_node else "float32"


def cell_memory(cell: Cell, cfg=None) -> tuple[memory.MemoryEstimate, list[str]]:
    """The most loaded GPU of a cell and, when it does not fit, layouts that would."""
    from megatron_cpt.models.qwen2 import ModelConfig

    cfg = cfg or cell.train_config()
    model = ModelConfig.load(cell.size.model)
    lay = memory.Layout.from_config(cfg, cell.world_size, cell_dtype(cell, cfg))
    gpu_gb = cell.study.resources.gpu_memory_gb
    est = memory.estimate(model, lay, gpu_gb)
    if est.fits:
        return est, []
    max_tp = cell.study.resources.gpus_per_node or cell.tasks_per_node
    return est, memory.suggestions(model, lay, gpu_gb, cfg.batch.global_batch_size, max_tp)


def check_memory(cell: Cell) -> None:
    """Refuse (exit 2) a cell whose most loaded GPU exceeds ``resources.gpu_memory_gb``."""
    est, fixes = cell_memory(cell)
    if not est.fits:
        raise UsageError(memory.refusal(f"size {cell.size.name}", est, fixes))


def cell_storage(cell: Cell, cfg, dtype: str) -> dict:
    """Peak checkpoint bytes of one cell, before/after weights-only evaluation checkpoints."""
    from megatron_cpt.models.qwen2 import ModelConfig
    from megatron_cpt.training import budget

    model = ModelConfig.load(cell.size.model)
    c = cfg.checkpoint
    bud = budget.compute_budget(model, cfg.data.seq_length, cfg.batch.global_batch_size,
                                tokens=cfg.budget.tokens, flops=cfg.budget.flops,
                                iterations=cfg.budget.iterations,
                                checkpoint_every_tokens=c.every_tokens, save_at_end=c.save_at_end)
    every = budget.every_iters(c.keep_every_tokens, bud.tokens_per_iteration, bud.iterations) \
        if c.keep_every_tokens else None
    grid = {i for i in bud.checkpoint_iterations if every and i % every == 0}
    return memory.run_storage(memory.total_params(model), dtype, bud.checkpoint_iterations,
                              c.keep_last, grid, c.keep_optimizer_at_end)


def corpus_epochs(cell: Cell, tokens: int) -> float | None:
    """Epochs of the cell's training corpus the budget implies (None: no manifest yet); of
    the domain corpus for a replay cell (its 1 - r share of the tokens)."""
    from data_prep.manifest import load_manifest

    prefix = cell.train_prefix()
    if not Path(prefix + ".manifest.json").is_file():
        return None
    share = 1.0 - cell.general_fraction if cell.kind == "replay" else 1.0
    return memory.corpus_epochs(int(tokens * share), int(load_manifest(prefix).get("tokens", 0)))


def capacity_row(cell: Cell, tokens: int) -> dict:
    """Memory, storage and epochs of one cell (merged into ``grid.cost_rows``)."""
    cfg = cell.train_config()
    est, fixes = cell_memory(cell, cfg)
    return {"memory": est.to_dict(), "fits": est.fits, "suggestions": fixes,
            "storage": cell_storage(cell, cfg, cell_dtype(cell, cfg)),
            "epochs": corpus_epochs(cell, tokens)}


def _size(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1."""
    for unit, scale in (("TiB", TIB), ("GiB", 1024 ** 3), ("MiB", 1024 ** 2)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 1024:.1f} KiB"


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def print_capacity(study: StudyConfig, rows: list[dict]) -> None:
    """Memory per GPU per size, refusals, study storage before/after and corpus epochs."""
    print(f"\nmemory per GPU (most loaded pipeline stage; GiB; usable = GPU - {memory.CONTEXT_GIB:g} "
          f"GiB - {memory.FRAGMENTATION:.0%}):")
    print(f"{'size':<8} {'layout':<48} {'weights':>8} {'grads':>7} {'optim':>7} {'activ':>7} "
          f"{'total':>7} {'usable':>7}  fits")
    seen = set()
    for r in rows:
        if r["size"] in seen:
            continue
        seen.add(r["size"])
        mem, lay = r["memory"], r["memory"]["layout"]
        desc = (f"TP{lay['tp']} PP{lay['pp']} DP{lay['dp']} s{lay['seq_length']} mb"
                f"{lay['micro_batch']} x{lay['micro_batches']} {lay['recompute'] or 'no-recompute'}"
                f"{' SP' if lay['sequence_parallel'] else ''} {lay['dtype']}")
        print(f"{r['size']:<8} {desc:<48} {_gib(mem['weights_gib']):>8} "
              f"{_gib(mem['gradients_gib']):>7} {_gib(mem['optimizer_gib']):>7} "
              f"{_gib(mem['activations_gib']):>7} {_gib(mem['total_gib']):>7} "
              f"{_gib(mem['usable_gib']):>7}  {'yes' if r['fits'] else 'NO'}")
        if not r["fits"]:
            print(f"  does not fit; try: {' or '.join(r['suggestions']) or 'more nodes / PP'}")
    before = sum(r["storage"]["before_bytes"] for r in rows)
    after = sum(r["storage"]["after_bytes"] for r in rows)
    s = rows[0]["storage"] if rows else {}
    print(f"\ncheckpoint storage (peak, all cells): {_size(before)} with optimizer state in "
          f"every kept checkpoint; {_size(after)} with weights-only evaluation checkpoints "
          f"({before / max(after, 1):.1f}x less; per cell {s.get('evaluation_checkpoints')} "
          f"evaluation + {s.get('resume_checkpoints')} resume checkpoints)")
    rest = sum(r["storage"]["at_rest_bytes"] for r in rows)
    print(f"checkpoint storage (finished study, at rest): {_size(rest)} ({before / max(rest, 1):.1f}x "
          f"less than {_size(before)}; {'optimizer state dropped at the end of each run' if rest < after else 'the last resume checkpoints keep optimizer state (checkpoint.keep_optimizer_at_end)'})")
    epochs = [(r["size"] + "/" + r["cell"], r["epochs"]) for r in rows if r["epochs"] is not None]
    if epochs:
        print("corpus epochs the budget implies: " + ", ".join(
            f"{name} {e:.2f}{' (repeats data)' if e > 1 else ''}" for name, e in epochs))
