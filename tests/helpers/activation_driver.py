"""Bytes the real model saves for its backward pass during one training forward (CPU, one
process): every tensor autograd keeps, counted once per storage, weights excluded.

Usage: python tests/helpers/activation_driver.py OUT.json MODEL SEQ MICRO_BATCH [DTYPE]
(DTYPE float32, the default, or bfloat16.)
Writes one row per (attention backend, recompute mode).
"""
import json
import sys
from pathlib import Path

import torch


def saved_bytes(gpt, tokens) -> int:
    """Sum of the storages packed by autograd's saved-tensor hooks (a storage once)."""
    weights = {p.untyped_storage().data_ptr() for p in gpt.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in weights:
            seen[st.data_ptr()] = st.nbytes()
        return t

    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gpt(tokens, pos, None, labels=tokens)
    return sum(seen.values())


def main() -> None:
    from megatron_cpt.models.qwen2 import BuildOptions, ModelConfig, build_gpt_model
    from megatron_cpt.runtime import init_distributed, shutdown
    from megatron_cpt.training.config import TrainConfig
    from megatron_cpt.training.model_options import _memory_extra

    out, name, seq, micro = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    dtype = getattr(torch, sys.argv[5] if len(sys.argv) > 5 else "float32")
    init_distributed(1, 1)
    model = ModelConfig.load(name)
    tokens = torch.randint(0, model.vocab_size, (micro, seq))
    rows = []
    for backend in ("sdpa", "local"):
        for recompute in (None, "selective"):
            cfg = TrainConfig()
            cfg.memory.recompute = recompute
            gpt = build_gpt_model(model, BuildOptions(attention_backend=backend, use_te=False,
                                                      params_dtype=dtype, extra=_memory_extra(cfg)))
            rows.append({"backend": backend, "recompute": recompute,
                         "saved_bytes": saved_bytes(gpt.train(), tokens)})
    out.write_text(json.dumps(rows, indent=1))
    shutdown()


if __name__ == "__main__":
    main()
