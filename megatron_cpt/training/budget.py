"""Compute budget: FLOPs per token from the architecture, and the run length it buys.

FLOPs per token (training = forward + backward = 3 x forward; a multiply-add = 2 FLOPs)
follow Megatron-LM's ``num_floating_point_operations`` for a dense GQA + SwiGLU model::

    F = 12 * L * h^2 * [ (1 + G/H + s/h) * r  +  1.5 * f/h ]  +  6 * h * V

    L layers, h hidden size, H attention heads, G query groups (kv heads), s sequence length,
    r = H * d / h (query projection / hidden size; 1 for Qwen2.5), f FFN size, V padded
    vocabulary rows.

Reading the terms as "6N plus attention":
  * ``12 L h^2 (1 + G/H) r`` = 6 x the QKV and output projection weights
    (h*(H*d) + 2*h*(G*d) + (H*d)*h per layer, times 2 FLOPs per MAC, times 3);
  * ``12 L h^2 * 1.5 f/h``   = 6 x the SwiGLU weights (3 * h * f per layer);
  * ``12 L h s r``           = the attention scores QK^T and the weighted sum AV (s * H*d
    MACs each per token and layer, x 2 FLOPs x 3; the causal half is not removed, as Megatron);
  * ``6 h V``                = the output (logit) layer. The input embedding is a lookup and is
    not counted; tied or untied, the logit matmul is counted once — as Megatron does.
Norms, biases, RoPE and softmax are ignored (< 0.5 % for Qwen2.5).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from megatron_cpt.errors import UsageError
from megatron_cpt.models.qwen2 import ModelConfig


def flops_per_token(m: ModelConfig, seq_length: int) -> float:
    L, h, H, G, f = m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, \
        m.ffn_hidden_size
    r = H * m.kv_channels / h
    body = 12 * L * h * h * ((1 + G / H + seq_length / h) * r + 1.5 * f / h)
    return float(body + 6 * h * m.padded_vocab_size)


@dataclass(frozen=True)
class Budget:
    tokens_per_iteration: int
    flops_per_token: float
    iterations: int
    tokens: int
    flops: float
    checkpoint_every_iters: int
    checkpoint_iterations: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


def iterations_for(tokens: float | None, flops: float | None, iterations: int | None,
                   tokens_per_iteration: int, fpt: float) -> int:
    if iterations is not None:
        n = int(iterations)
    elif tokens is not None:
        n = int(tokens // tokens_per_iteration)
    else:
        n = int(flops // (fpt * tokens_per_iteration))
    if n < 1:
        one = f"{tokens_per_iteration} tokens = {fpt * tokens_per_iteration:.3g} FLOPs"
        raise UsageError(f"the budget buys 0 iterations (one step is {one}); "
                         "raise budget.tokens / budget.flops or lower batch.global_batch_size")
    return n


def every_iters(every_tokens: float | None, tokens_per_iteration: int, total: int) -> int:
    """Tokens between events -> iterations (rounded up; ``None`` -> only at the end)."""
    if not every_tokens:
        return total
    return max(1, math.ceil(every_tokens / tokens_per_iteration))


def compute_budget(model: ModelConfig, seq_length: int, global_batch_size: int, *,
                   tokens: float | None = None, flops: float | None = None,
                   iterations: int | None = None, checkpoint_every_tokens: float | None = None,
                   save_at_end: bool = True) -> Budget:
    tpi = seq_length * global_batch_size
    fpt = flops_per_token(model, seq_length)
    n = iterations_for(tokens, flops, iterations, tpi, fpt)
    every = every_iters(checkpoint_every_tokens, tpi, n)
    ckpts = list(range(every, n + 1, every))
    if save_at_end and (not ckpts or ckpts[-1] != n):
        ckpts.append(n)
    return Budget(tpi, fpt, n, n * tpi, n * tpi * fpt, every, ckpts)


def gpu_hours(budget: Budget, gpus: int, peak_tflops: float, mfu: float) -> float:
    """Wall-clock hours x GPUs at a model FLOPs utilization ``mfu`` of ``peak_tflops`` per GPU."""
    seconds = budget.flops / (gpus * peak_tflops * 1e12 * mfu)
    return seconds * gpus / 3600.0


def cost_estimate(cfg, model: ModelConfig, gpus: int | None, mfu: float, peak: float) -> dict:
    """Tokens, FLOPs, iterations, checkpoints and GPU-hours of one training config (a
    ``TrainConfig``) on ``gpus`` GPUs (default TP x PP): one row of ``megatron-cpt plan``."""
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
