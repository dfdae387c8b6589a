"""``megatron-cpt convert``: HF <-> Megatron checkpoints, and verification of a conversion."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from megatron_cpt.config_ranges import arg_range


def register(sub, name: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    conv = parser.add_subparsers(dest="convert_cmd", metavar="CMD", required=True)

    p = conv.add_parser("hf-to-mcore", help="Hugging Face Qwen2.5 folder -> Megatron dist checkpoint",
                        description="Convert a local Hugging Face Qwen2/Qwen2.5 folder (config.json, "
                        "safetensors, tokenizer) into a Megatron-core dist checkpoint that loads at any "
                        "TP/PP. Streams one shard at a time.")
    p.add_argument("--hf", type=Path, required=True, help="Hugging Face model folder")
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to create")
    p.add_argument("--name", help="model name recorded in model.yaml (default: folder name)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_hf_to_mcore)

    p = conv.add_parser("mcore-to-hf", help="Megatron checkpoint -> Hugging Face folder",
                        description="Export a converted or trained checkpoint as a Hugging Face "
                        "Qwen2 folder (config.json, sharded safetensors + index, tokenizer).")
    p.add_argument("--ckpt", type=Path, required=True, help="checkpoint folder (has metadata.json)")
    p.add_argument("--out", type=Path, required=True, help="Hugging Face folder to create")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default: the checkpoint's)")
    p.add_argument("--max-shard-gb", **arg_range(float, 0, lo_open=True), default=5.0, help="safetensors shard size")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_mcore_to_hf)

    p = conv.add_parser("mcore-to-nemo", help="Megatron checkpoint -> NeMo 2 checkpoint",
                        description="Export a converted or trained checkpoint as a NeMo 2 checkpoint "
                        "folder (context/ with io.json, model.yaml, nemo_tokenizer/; weights/ as a "
                        "Megatron dist checkpoint under NeMo's key names) that NeMo 2.7.3 loads with "
                        "nemo.lightning.io.load_context and exports with llm.export_ckpt. NeMo itself "
                        "is not needed. See docs/nemo.md.")
    p.add_argument("--ckpt", type=Path, required=True, help="checkpoint folder (has metadata.json)")
    p.add_argument("--out", type=Path, required=True, help="NeMo checkpoint folder to create")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="weights dtype and NeMo params_dtype (default: the checkpoint's)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_mcore_to_nemo)

    p = conv.add_parser("verify", help="compare logits of HF and Megatron at a TP/PP",
                        description="Feed one fixed token batch to transformers and to the Megatron "
                        "model at --tp/--pp; print the max logit difference and both losses; exit 1 "
                        "above tolerance. Run under torchrun with TP*PP processes, e.g. "
                        "`torchrun --nproc_per_node 4 -m megatron_cpt convert verify --hf HF "
                        "--ckpt CKPT --tp 2 --pp 2`.")
    p.add_argument("--hf", type=Path, required=True, help="Hugging Face model folder")
    p.add_argument("--ckpt", type=Path, required=True, help="Megatron checkpoint folder")
    p.add_argument("--tp", **arg_range(int, 1), default=1, help="tensor-parallel size")
    p.add_argument("--pp", **arg_range(int, 1), default=1, help="pipeline-parallel size")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--tolerance", **arg_range(float, 0), default=1e-4,
                   help="max relative logit difference (max|diff| / max|logit|)")
    p.add_argument("--seq-len", **arg_range(int, 1), default=64)
    p.add_argument("--json", type=Path, help="also write the result as JSON here")
    p.set_defaults(func=_verify)


def _hf_to_mcore(args: argparse.Namespace) -> int:
    from megatron_cpt.checkpoint.convert import hf_to_mcore

    info = hf_to_mcore(args.hf, args.out, force=args.force, name=args.name)
    print(f"wrote {info['out']}: {info['tensors']} HF tensors in {info['seconds']:.1f} s")
    return 0


def _mcore_to_hf(args: argparse.Namespace) -> int:
    from megatron_cpt.checkpoint.convert import mcore_to_hf

    info = mcore_to_hf(args.ckpt, args.out, force=args.force, dtype=args.dtype,
                       max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"wrote {info['out']}: {', '.join(info['files'])} in {info['seconds']:.1f} s")
    return 0


def _mcore_to_nemo(args: argparse.Namespace) -> int:
    from megatron_cpt.checkpoint.nemo import mcore_to_nemo

    info = mcore_to_nemo(args.ckpt, args.out, force=args.force, dtype=args.dtype)
    print(f"wrote {info['out']}: NeMo 2 checkpoint, {info['tensors']} tensors ({info['dtype']}) "
          f"in {info['seconds']:.1f} s")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from megatron_cpt.checkpoint.verify import format_table, verify
    from megatron_cpt.runtime import shutdown

    result, ok = verify(args.hf, args.ckpt, tp=args.tp, pp=args.pp, dtype=args.dtype,
                        tolerance=args.tolerance, seq=args.seq_len, json_out=args.json)
    if result is not None:
        print(format_table([result]))
        print(json.dumps({"verify": result.__dict__}))
    shutdown()
    return 0 if ok else 1
