"""HF <-> Megatron conversion driven by :mod:`megatron_cpt.checkpoint.mapping`.

Both directions build the Megatron model once at TP1/PP1 (a single process) and move
tensors through it one HF shard at a time, so the model is never held twice.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_cpt.checkpoint import hf_files, mapping, store
from megatron_cpt.errors import UsageError
from megatron_cpt.models.qwen2 import BuildOptions, ModelConfig


@dataclass(frozen=True)
class HFSource:
    """A validated Hugging Face model folder (nothing loaded yet)."""

    path: Path
    model: ModelConfig
    shards: dict[Path, list[str]]
    dtype: torch.dtype
    tokenizer_size: int | None


def inspect_hf(hf_dir: Path, name: str | None = None) -> HFSource:
    """Every check that can fail on the HF side, before any model is allocated."""
    hf_dir = Path(hf_dir)
    cfg = hf_files.read_hf_config(hf_dir)
    model = ModelConfig.from_hf_config(cfg, name=name or hf_dir.name)
    shards = hf_files.list_shards(hf_dir)
    names = {n for ns in shards.values() for n in ns}
    needed = {h for m in mapping.expand(model) for h in m.hf}
    missing = sorted(needed - names)
    if missing:
        raise UsageError(f"{hf_dir} lacks {len(missing)} tensors the {cfg['architectures'][0]} "
                         f"config needs (first: {missing[0]}); the checkpoint is incomplete")
    tok_size = hf_files.tokenizer_size(hf_dir)
    if tok_size is not None and tok_size > model.vocab_size:
        raise UsageError(f"the tokenizer has {tok_size} tokens but the embedding only "
                         f"{model.vocab_size} rows; use the tokenizer that belongs to this model")
    dtype_name = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    first = next(iter(shards))
    from safetensors import safe_open

    with safe_open(str(first), framework="pt") as f:
        dtype = f.get_slice(shards[first][0]).get_dtype()
    dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(
        dtype, store.DTYPES.get(dtype_name, torch.float32))
    return HFSource(hf_dir, model, shards, dtype, tok_size)


def _empty_model(model_cfg: ModelConfig, dtype: torch.dtype):
    """TP1/PP1, local spec (the mapping's names), weights left for the HF tensors to fill."""
    from megatron_cpt.models.qwen2 import build_gpt_model
    from megatron_cpt.runtime import init_distributed

    init_distributed(tp=1, pp=1)
    return build_gpt_model(model_cfg, BuildOptions(params_dtype=dtype, use_te=False,
                                                   attention_backend="local", init_weights=False))


def hf_to_mcore(hf_dir: Path, out: Path, force: bool = False, name: str | None = None) -> dict:
    """Convert a Hugging Face Qwen2 folder into a Megatron dist checkpoint folder."""
    src = inspect_hf(hf_dir, name)
    store.check_output_dir(out, force)
    t0 = time.perf_counter()
    gpt = _empty_model(src.model, src.dtype)
    params = dict(gpt.named_parameters())
    table = mapping.expand(src.model)
    by_hf = {h: m for m in table for h in m.hf}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    hashes: dict[str, str] = {}
    done: set[str] = set()
    total = sum(len(v) for v in src.shards.values())
    for hf_name, tensor in tqdm(hf_files.iter_tensors(src.shards), total=total,
                                desc="hf -> mcore", unit="tensor", leave=False):
        if hf_name.endswith(mapping.IGNORED_HF_SUFFIXES):
            continue
        if hf_name == "lm_head.weight" and src.model.tie_word_embeddings:
            continue  # a tied model's lm_head is the embedding
        m = by_hf.get(hf_name)
        if m is None:
            raise UsageError(f"unexpected tensor {hf_name} in {src.path}; not a Qwen2 checkpoint?")
        hashes[hf_name] = store.tensor_sha256(tensor)
        parts = pending.setdefault(m.mcore, {})
        parts[hf_name] = tensor
        if len(parts) < len(m.hf):
            continue
        value = mapping.to_mcore(m.transform, [parts[h] for h in m.hf], src.model)
        target = params[m.mcore]
        if value.shape != target.shape:
            raise UsageError(f"{m.mcore}: HF gives shape {tuple(value.shape)}, the model "
                             f"expects {tuple(target.shape)}; config.json does not match the weights")
        with torch.no_grad():
            target.copy_(value)
        done.add(m.mcore)
        del pending[m.mcore]
    missing = sorted(set(params) - done)
    if missing:
        raise UsageError(f"no HF tensor filled {missing[:3]}; the checkpoint is incomplete")
    with store.atomic_dir(out, force=force) as tmp:
        store.save_weights(gpt.sharded_state_dict(), tmp)
        src.model.save(tmp / store.MODEL_YAML)
        tok_files = hf_files.copy_tokenizer(src.path, tmp / store.TOKENIZER)
        meta = {
            "iteration": 0,
            "kind": "pretrained",
            "dtype": str(src.dtype).removeprefix("torch."),
            "source": {"type": "hf", "path": str(src.path.resolve())},
            "architecture": src.model.to_dict(),
            "tokenizer_files": tok_files,
            "tokenizer_size": src.tokenizer_size,
            "hf_tensor_sha256": hashes,
        }
        store.write_metadata(tmp, meta)
    return {"seconds": time.perf_counter() - t0, "tensors": len(hashes), "out": str(out)}


def mcore_to_hf(ckpt: Path, out: Path, force: bool = False, dtype: str | None = None,
                max_shard_bytes: int = 5 * 2**30) -> dict:
    """Export a checkpoint folder (converted or trained) as a Hugging Face Qwen2 folder."""
    dtype_name = store.export_dtype(store.read_metadata(ckpt), dtype)
    store.check_output_dir(out, force)
    t0 = time.perf_counter()
    gpt, model_cfg = store.load_model(ckpt, dtype=dtype_name, local_spec=True)
    params = dict(gpt.named_parameters())
    with store.atomic_dir(out, force=force) as tmp:
        writer = hf_files.ShardedSafetensorsWriter(tmp, max_shard_bytes)
        for m in tqdm(mapping.expand(model_cfg), desc="mcore -> hf", unit="tensor", leave=False):
            for hf_name, t in zip(m.hf, mapping.to_hf(m.transform, params[m.mcore].data, model_cfg)):
                # Megatron keeps some tensors (the local spec's norms) in fp32 whatever
                # params_dtype is; HF files hold one dtype
                writer.add(hf_name, t.to(store.DTYPES[dtype_name]))
        files = writer.close()
        (tmp / "config.json").write_text(json.dumps(model_cfg.to_hf_config(dtype_name), indent=2))
        hf_files.copy_tokenizer(Path(ckpt) / store.TOKENIZER, tmp)
    return {"seconds": time.perf_counter() - t0, "files": files, "out": str(out)}
