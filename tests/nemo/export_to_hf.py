"""Run inside .venv-nemo (NeMo 2.7.3): load a NeMo 2 checkpoint with NeMo's own API and export
it to Hugging Face with NeMo's own exporter.

    .venv-nemo/bin/python tests/nemo/export_to_hf.py --nemo CKPT --out HF_DIR --report REPORT.json

1. ``nemo.lightning.io.load_context(CKPT, subpath="model")`` rebuilds the model object from
   context/io.json; its config and tokenizer are written to REPORT.json for the test to check.
2. ``llm.export_ckpt(CKPT, target="hf")`` loads weights/ (NeMo's MegatronStrategy, Megatron-core
   0.15.3 dist checkpointing) and converts them with NeMo's HFQwen2Exporter.

The CPU patches applied first (tests/nemo/nemo_cpu.py) touch only device handling and, without
Transformer Engine, the norm names NeMo's state mapping expects; no conversion logic.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nemo_cpu  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nemo", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--report", type=Path, required=True)
    args = ap.parse_args()

    nemo_cpu.apply()
    import nemo
    from nemo.collections import llm
    from nemo.lightning.io import load_context

    model = load_context(args.nemo, subpath="model")
    c = model.config
    report = {
        "nemo_version": nemo.__version__,
        "model_class": type(model).__qualname__,
        "config_class": type(c).__qualname__,
        "config": {k: getattr(c, k) for k in (
            "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
            "vocab_size", "seq_length", "rotary_base", "layernorm_epsilon", "normalization",
            "add_qkv_bias", "add_bias_linear", "gated_linear_unit", "share_embeddings_and_output_weights",
            "make_vocab_size_divisible_by", "position_embedding_type", "bf16", "fp16")},
        "params_dtype": str(c.params_dtype),
        "activation_func": getattr(c.activation_func, "__name__", str(c.activation_func)),
        "tokenizer_class": type(model.tokenizer).__qualname__,
        "tokenizer_vocab_size": model.tokenizer.vocab_size,
    }
    out = llm.export_ckpt(path=args.nemo, target="hf", output_path=args.out, overwrite=True)
    report["exported"] = str(out)
    args.report.write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
