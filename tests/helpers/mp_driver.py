"""Run several conversion checks inside one torchrun job (saves process start-ups).

Usage: torchrun --nproc_per_node N tests/helpers/mp_driver.py STEPS.json RESULTS.json
Each step: {"op": "compare", "hf", "ckpt", "tp", "pp"},
           {"op": "reshard_save", "ckpt", "out", "tp", "pp"} (load at TP/PP, save a copy), or
           {"op": "attention", "ckpt", "tp", "pp"} (logits with SDPA vs Megatron's local attention).
"""
import json
import sys
from pathlib import Path

import torch.distributed as dist


def main() -> None:
    from megatron_cpt.checkpoint import store
    from megatron_cpt.checkpoint.verify import compare
    from megatron_cpt.models.qwen2 import BuildOptions, build_gpt_model
    from megatron_cpt.runtime import init_distributed, shutdown

    steps = json.loads(Path(sys.argv[1]).read_text())
    results = []
    for step in steps:
        if step["op"] == "compare":
            result, ok = compare(Path(step["hf"]), Path(step["ckpt"]), step["tp"], step["pp"])
            if result is not None:
                results.append({**step, **result.__dict__})
        elif step["op"] == "reshard_save":
            init_distributed(step["tp"], step["pp"])
            ckpt = Path(step["ckpt"])
            cfg = store.read_model_config(ckpt)
            gpt = build_gpt_model(cfg, BuildOptions(tp=step["tp"], pp=step["pp"], init_weights=False))
            store.load_model_weights(gpt, ckpt)
            meta = {k: v for k, v in store.read_metadata(ckpt).items() if k != "format"}
            meta["saved_at"] = {"tp": step["tp"], "pp": step["pp"]}
            store.save_checkpoint(gpt.sharded_state_dict(), Path(step["out"]), cfg, meta,
                                  ckpt / store.TOKENIZER)
        elif step["op"] == "attention":
            from megatron_cpt.checkpoint.verify import fixed_batch
            from megatron_cpt.models.forward import forward_logits

            init_distributed(step["tp"], step["pp"])
            ckpt = Path(step["ckpt"])
            cfg = store.read_model_config(ckpt)
            logits = {}
            for backend in ("local", "sdpa"):
                gpt = build_gpt_model(cfg, BuildOptions(tp=step["tp"], pp=step["pp"],
                                                        attention_backend=backend,
                                                        init_weights=False))
                store.load_model_weights(gpt, ckpt)
                logits[backend] = forward_logits(gpt, fixed_batch(cfg.vocab_size, seq=96),
                                                 cfg.vocab_size)
            if logits["local"] is not None and dist.get_rank() == dist.get_world_size() - 1:
                diff = (logits["sdpa"] - logits["local"]).abs().max().item()
                results.append({**step, "max_abs_diff": diff,
                                "max_abs_logit": logits["local"].abs().max().item()})
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        Path(sys.argv[2]).write_text(json.dumps([r for rs in gathered for r in rs], indent=2))
    shutdown()


if __name__ == "__main__":
    main()
