"""Measure the tensors of the real training state (GPTModel + Megatron DDP + the distributed
optimizer, as the loop builds them) at several TP/PP layouts inside one torchrun job.

Usage: torchrun --nproc_per_node 4 tests/helpers/memory_driver.py OUT.json MODEL DTYPE...
Each rank reports, per (model, dtype, tp, pp): its TP/PP/DP ranks, parameter count and bytes,
main-grad bytes, the padded grad-buffer size and the optimizer-state bytes it holds (Adam
moments plus fp32 main parameters that are not views of the model's own weights).
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def _storages(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def measure(model_name: str, dtype: str, tp: int, pp: int) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_cpt.models.qwen2 import ModelConfig
    from megatron_cpt.runtime import init_distributed
    from megatron_cpt.training.checkpointing import _init_optimizer_state
    from megatron_cpt.training.config import TrainConfig
    from megatron_cpt.training.loop import build_training_state

    init_distributed(tp, pp)
    cfg = TrainConfig()
    cfg.parallel.tp, cfg.parallel.pp = tp, pp
    gpt, model, optimizer, _ = build_training_state(
        cfg, ModelConfig.load(model_name), getattr(torch, dtype), 10, torch.device("cpu"))
    _init_optimizer_state(optimizer)
    params = list(gpt.parameters())
    own = _storages(params)
    opt_bytes = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                if p.untyped_storage().data_ptr() not in own:  # an fp32 main copy
                    opt_bytes += p.numel() * p.element_size()
        for state in inner.state.values():
            opt_bytes += sum(v.numel() * v.element_size() for k, v in state.items()
                             if k != "step" and isinstance(v, torch.Tensor))
    return {"model": model_name, "dtype": dtype, "tp": tp, "pp": pp,
            "tp_rank": ps.get_tensor_model_parallel_rank(),
            "pp_rank": ps.get_pipeline_model_parallel_rank(),
            "dp_rank": ps.get_data_parallel_rank(), "dp": ps.get_data_parallel_world_size(),
            "params": sum(p.numel() for p in params),
            "param_bytes": sum(p.numel() * p.element_size() for p in params),
            # Megatron's torch-norm fallback (no Apex/TE) keeps RMSNorm weights in fp32
            "fp32_params": sum(p.numel() for p in params if p.dtype == torch.float32),
            "grad_bytes": sum(p.main_grad.numel() * p.main_grad.element_size() for p in params),
            "grad_buffer_elems": sum(b.grad_data.numel() for b in model.buffers),
            "optimizer_bytes": opt_bytes}


def main() -> None:
    from megatron_cpt.runtime import shutdown

    out, models, dtypes = Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3:]
    results = [measure(m, d, tp, pp) for m in models for d in dtypes
               for tp in (1, 2) for pp in (1, 2)]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        out.write_text(json.dumps([r for rs in gathered for r in rs], indent=1))
    shutdown()


if __name__ == "__main__":
    main()
