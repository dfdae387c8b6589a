"""``convert verify``: the same token batch through transformers and through the Megatron
model at a given TP/PP; compare logits and losses. Run it before spending GPU hours.

The HF reference runs on the CPU (a second copy of the model beside a GPU rank's shard would
not fit); its logits are moved to the Megatron logits' device before any comparison."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_cpt.checkpoint import store
from megatron_cpt.errors import UsageError
from megatron_cpt.models.qwen2 import ModelConfig


@dataclass
class VerifyResult:
    tp: int
    pp: int
    dtype: str
    max_abs_diff: float
    max_rel_diff: float  # max |mcore - hf| / max |hf|
    loss_hf: float
    loss_mcore: float
    tolerance: float
    ok: bool


def fixed_batch(vocab_size: int, batch: int = 2, seq: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=g)


def next_token_nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss, on ``logits``' device (the tokens are moved there)."""
    targets = tokens[:, 1:].reshape(-1).to(logits.device)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets)


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    return next_token_nll(logits, tokens).item()


def logit_gaps(logits: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max |logits - ref|, that over max |ref|) on ``logits``' device (``ref`` is moved)."""
    ref = ref.to(logits.device)
    gap = (logits - ref).abs().max()
    return gap, gap / ref.abs().max()


def agree_ok(ok: bool) -> bool:
    """Collective: whether any rank (the reporter) found the logits within tolerance."""
    from megatron_cpt.runtime import all_reduce_values

    return all_reduce_values([float(ok)], op=dist.ReduceOp.MAX)[0] > 0


def hf_logits(hf_dir: Path, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype,
                                                 attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def check_world(model_cfg: ModelConfig, tp: int, pp: int) -> None:
    model_cfg.check_parallel(tp, pp)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp * pp:
        raise UsageError(f"verify needs exactly TP*PP = {tp * pp} processes, got {world}; run "
                         f"`torchrun --nproc_per_node {tp * pp} -m megatron_cpt convert verify ...`")


def verify(hf_dir: Path, ckpt: Path, tp: int = 1, pp: int = 1, dtype: str = "float32",
           tolerance: float = 1e-4, seq: int = 64,
           json_out: Path | None = None) -> tuple[VerifyResult | None, bool]:
    """Collective over TP*PP ranks. Returns ``(result, ok)``: the result on the last
    pipeline stage's first TP rank (None elsewhere); every rank learns ``ok``."""
    model_cfg = store.read_model_config(ckpt)
    if dtype not in store.DTYPES:
        raise UsageError(f"unknown --dtype {dtype!r}; choose one of {sorted(store.DTYPES)}")
    if not (Path(hf_dir) / "config.json").is_file():
        raise UsageError(f"{hf_dir}/config.json not found; --hf must be a Hugging Face model folder")
    check_world(model_cfg, tp, pp)
    return compare(hf_dir, ckpt, tp, pp, dtype, tolerance, seq, json_out)


def compare(hf_dir: Path, ckpt: Path, tp: int, pp: int, dtype: str = "float32",
            tolerance: float = 1e-4, seq: int = 64,
            json_out: Path | None = None) -> tuple[VerifyResult | None, bool]:
    """:func:`verify` without the world-size check (the world may hold several DP replicas)."""
    from megatron.core import parallel_state

    from megatron_cpt.models.forward import forward_logits

    gpt, model_cfg = store.load_model(ckpt, tp, pp, dtype)
    torch_dtype = store.DTYPES[dtype]
    tokens = fixed_batch(model_cfg.vocab_size, seq=seq)
    logits = forward_logits(gpt, tokens, vocab_size=model_cfg.vocab_size)
    reporter = (parallel_state.is_pipeline_last_stage()
                and parallel_state.get_tensor_model_parallel_rank() == 0
                and parallel_state.get_data_parallel_rank() == 0)
    result = None
    if reporter:
        ref = hf_logits(Path(hf_dir), tokens, torch_dtype)
        gap, rel = logit_gaps(logits, ref)
        result = VerifyResult(
            tp=tp, pp=pp, dtype=dtype, max_abs_diff=gap.item(), max_rel_diff=rel.item(),
            loss_hf=next_token_loss(ref, tokens), loss_mcore=next_token_loss(logits, tokens),
            tolerance=tolerance, ok=rel.item() <= tolerance)
        if json_out is not None:
            Path(json_out).write_text(json.dumps(asdict(result), indent=2))
    return result, agree_ok(result is not None and result.ok)


def format_table(results: list[VerifyResult]) -> str:
    head = "| TP | PP | dtype | max abs diff | max rel diff | loss HF | loss Megatron | ok |"
    rows = [head, "|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r.tp} | {r.pp} | {r.dtype} | {r.max_abs_diff:.2e} | {r.max_rel_diff:.2e} "
                    f"| {r.loss_hf:.6f} | {r.loss_mcore:.6f} | {'yes' if r.ok else 'NO'} |")
    return "\n".join(rows)
