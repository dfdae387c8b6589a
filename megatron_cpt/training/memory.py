"""Memory planner: what one GPU of a training layout holds, and what a run's checkpoints
occupy on disk, computed from the architecture before any job waits in a queue.

Per GPU (the most loaded pipeline stage), in bytes:

* **weights**: the rank's parameters (exact: the tensors Megatron-core's GPTModel builds at
  that TP/PP rank, padded vocabulary, tied output layer copied onto the last stage when PP > 1)
  x the training dtype (2 for bf16, 4 for fp32), plus 2 bytes per linear weight of the FP8
  layers for Transformer Engine's FP8 copies (row- and column-wise);
* **gradients**: Megatron DDP's buffer with ``grad_reduce_in_fp32`` (the loop's setting):
  4 bytes per parameter;
* **optimizer shard**: Adam's two fp32 moments, plus an fp32 main copy of each parameter when
  the weights are not fp32: 12 (bf16) or 8 (fp32) bytes per parameter, divided by DP with the
  distributed optimizer. (Weights + gradients + optimizer = Megatron-LM's ``6 + 12/DP`` bytes
  per parameter for bf16.)
* **activations**: tensors saved for the backward pass of one micro batch (sequence s, micro
  batch b) per layer, times the layers of the stage, times the micro batches in flight
  (1F1B: the first stage holds ``min(PP, micro batches per step)``), plus the embedding's
  indices on the first stage and the logits on the last (the fp32 softmax the cross entropy
  keeps, plus the bf16 logits it is computed from when training in bf16). Per layer and micro batch (elements; h hidden, q = heads x head dim, k = kv heads x
  head dim, f FFN size, t TP)::

      4 s b h      the two RMSNorm inputs and the QKV / FC1 inputs  (/ t with sequence parallel)
      s b (3q + 3k + 3f) / t   the fused QKV output (q + 2k: kept alive by v, a view of it),
                               the rotated q and k, the attention output (q), SwiGLU's input
                               (2f) and FC2's input (f)
      + b (H / t) s^2          Megatron's unfused ("local") attention only, unless selective
                               recompute: the softmax probabilities, at 4 + 2 bytes in bf16
                               (the softmax runs in fp32 and keeps its fp32 output; the
                               probabilities @ V matmul keeps their bf16 copy), 4 in fp32
                               (dropout 0 keeps no mask)

  Selective recompute drops the attention-score term (FlashAttention / SDPA never store it);
  full recompute keeps one layer input per ``recompute_num_layers`` chunk (uniform) or per
  recomputed layer (block) plus one chunk's activations during its backward. No dropout
  (Qwen2.5 trains with 0) means no dropout masks.
* **loss gradient**: the loss's backward makes the fp32 gradient of the logits
  (``s b V / t`` x 4 bytes, last stage) while every activation is still saved: the peak of a
  step, measured on an H200 (docs/benchmarks.md, "Memory planner against a GPU").
* **runtime reserve**: CUDA context and NCCL buffers (:data:`CONTEXT_GIB`) and allocator
  fragmentation (:data:`FRAGMENTATION` of the GPU): a cell fits when the total is at most the
  GPU memory minus this reserve.

Checkpoint storage per parameter: an evaluation (weights-only) checkpoint holds the weights in
the training dtype (2 bytes bf16, 4 fp32); a resume checkpoint adds the distributed optimizer's
fp32 main parameters and two Adam moments (12 bytes): 14 bytes bf16, 16 fp32.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from megatron_cpt.models.qwen2 import ModelConfig

GIB = 1024 ** 3
CONTEXT_GIB = 2.0        # CUDA context + NCCL communicator buffers per GPU
FRAGMENTATION = 0.10     # PyTorch caching-allocator fragmentation, as a fraction of the GPU
DTYPE_BYTES = {"bfloat16": 2, "float32": 4}
GRAD_BYTES = 4           # DDP grad buffer in fp32 (grad_reduce_in_fp32=True in the loop)
ADAM_BYTES = 8           # exp_avg + exp_avg_sq, fp32
MAIN_PARAM_BYTES = 4     # the fp32 master copy of a bf16 weight
INDEX_BYTES = 8          # int64 token ids kept by the embedding lookup


@dataclass(frozen=True)
class Layout:
    """How one training job runs a model: parallelism, batch, recompute and precision."""

    tp: int
    pp: int
    dp: int
    seq_length: int
    micro_batch: int
    micro_batches: int              # per DP rank per step (gradient accumulation)
    dtype: str = "bfloat16"
    recompute: str | None = None    # None | selective | full
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    fused_attention: bool = True    # TE / SDPA (flash); False: Megatron's local attention
    fp8: bool = False               # FP8 matmuls (Transformer Engine)
    fp8_bf16_layers: int = 0        # of which first + last layers kept in bf16

    @classmethod
    def from_config(cls, cfg, world: int, dtype: str) -> "Layout":
        """The layout of a ``TrainConfig`` launched on ``world`` ranks in ``dtype``."""
        p, b, m = cfg.parallel, cfg.batch, cfg.memory
        dp = max(1, world // (p.tp * p.pp))
        pr = cfg.precision
        return cls(tp=p.tp, pp=p.pp, dp=dp, seq_length=cfg.data.seq_length,
                   micro_batch=b.micro_batch_size,
                   micro_batches=max(1, b.global_batch_size // (b.micro_batch_size * dp)),
                   dtype=dtype, recompute=m.recompute, recompute_method=m.recompute_method,
                   recompute_num_layers=m.recompute_num_layers,
                   sequence_parallel=p.sequence_parallel and p.tp > 1,
                   distributed_optimizer=p.distributed_optimizer,
                   fused_attention=cfg.model.attention_backend != "local", fp8=bool(pr.fp8),
                   fp8_bf16_layers=pr.fp8_bf16_first_layers + pr.fp8_bf16_last_layers)

    def describe(self) -> str:
        return (f"TP{self.tp} PP{self.pp} DP{self.dp}, micro batch {self.micro_batch}, "
                f"recompute {self.recompute or 'none'}")


# -- parameters -------------------------------------------------------------------------------
def layer_params(m: ModelConfig, tp: int) -> dict[str, int]:
    """One transformer layer's parameters on one TP rank: ``linear`` (the QKV, output
    projection, FC1 and FC2 weights, sharded over TP), ``bias`` (QKV's, sharded) and
    ``replicated`` (the two RMSNorm weights)."""
    h, f, d = m.hidden_size, m.ffn_hidden_size, m.kv_channels
    qkv = (m.num_attention_heads + 2 * m.num_query_groups) * d
    q = m.num_attention_heads * d
    return {"linear": (qkv * h + q * h + 2 * f * h + f * h) // tp, "bias": qkv // tp,
            "replicated": 2 * h}


def stage_params(m: ModelConfig, tp: int, pp: int, stage: int) -> int:
    """Parameters held by a rank of pipeline stage ``stage`` (exact for Megatron's GPTModel)."""
    lp = layer_params(m, tp)
    n = (m.num_layers // pp) * sum(lp.values())
    embedding = m.padded_vocab_size * m.hidden_size // tp
    first, last = stage == 0, stage == pp - 1
    if first:
        n += embedding
    if last:
        n += m.hidden_size  # final RMSNorm
        if not m.tie_word_embeddings or pp > 1:  # tied + PP > 1: a synced copy on the last stage
            n += embedding
    return n


def total_params(m: ModelConfig) -> int:
    """Parameters of the whole Megatron model (padded vocabulary; a tied embedding once)."""
    return stage_params(m, 1, 1, 0)


# -- per-GPU memory ---------------------------------------------------------------------------
def _layer_activation_elems(m: ModelConfig, lay: Layout) -> float:
    """Elements saved for backward by one layer for one micro batch (module docstring)."""
    s, b, t = lay.seq_length, lay.micro_batch, lay.tp
    h, f, d = m.hidden_size, m.ffn_hidden_size, m.kv_channels
    q, k = m.num_attention_heads * d, m.num_query_groups * d
    norm_side = 4 * s * b * h / (t if lay.sequence_parallel else 1)
    split = s * b * (3 * q + 3 * k + 3 * f) / t
    return norm_side + split


def _attention_score_bytes(m: ModelConfig, lay: Layout) -> float:
    """What Megatron's local attention keeps of its b (H/t) s^2 scores for one layer and micro
    batch: the fp32 softmax output (``attention_softmax_in_fp32``) and, below fp32, the copy in
    the training dtype that the probabilities @ V matmul keeps. Fused attention (TE, SDPA) and
    selective recompute keep none. Measured 5.9 bytes per score on CPU (tiny-b, bf16;
    tests/test_memory_planner.py) and 6.1 on an H200 (0.5B, 1.5B)."""
    if lay.fused_attention or lay.recompute == "selective":
        return 0.0
    a = DTYPE_BYTES[lay.dtype]
    per_score = 4 + (a if a < 4 else 0)
    s, b = lay.seq_length, lay.micro_batch
    return b * (m.num_attention_heads / lay.tp) * s * s * per_score


def loss_gradient_bytes(m: ModelConfig, lay: Layout, stage: int) -> float:
    """The fp32 gradient of the logits that the loss's backward allocates on the last stage
    while every saved activation is still alive (the step's peak)."""
    if stage != lay.pp - 1:
        return 0.0
    return lay.seq_length * lay.micro_batch * (m.padded_vocab_size / lay.tp) * 4


def _stage_activations(m: ModelConfig, lay: Layout, stage: int) -> float:
    """Activation bytes of a rank of pipeline stage ``stage`` at its peak."""
    a = DTYPE_BYTES[lay.dtype]
    s, b, t = lay.seq_length, lay.micro_batch, lay.tp
    layers = m.num_layers // lay.pp
    per_layer = _layer_activation_elems(m, lay) * a + _attention_score_bytes(m, lay)
    layer_input = s * b * m.hidden_size / (t if lay.sequence_parallel else 1) * a
    if lay.recompute == "full":
        n = max(1, lay.recompute_num_layers)
        if lay.recompute_method == "block":
            stored = min(n, layers) * layer_input + max(0, layers - n) * per_layer
            body = stored + (per_layer if n else 0)
        else:
            body = math.ceil(layers / n) * layer_input + min(n, layers) * per_layer
    else:
        body = layers * per_layer
    if stage == 0:
        body += s * b * INDEX_BYTES
    in_flight = min(lay.pp - stage, lay.micro_batches)
    total = in_flight * body
    if stage == lay.pp - 1:  # final norm + output layer inputs, logits and their fp32 softmax
        logit_bytes = 4 + (a if a < 4 else 0)
        total += 2 * layer_input + s * b * (m.padded_vocab_size / t) * logit_bytes
    return total


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the most loaded GPU of a layout, against the GPU's memory."""

    layout: Layout
    stage: int                 # the most loaded pipeline stage
    params: int                # parameters on that rank
    weights: float
    gradients: float
    optimizer: float
    activations: float         # saved for backward
    loss_gradient: float       # the logits' fp32 gradient at the step's peak (last stage)
    gpu_memory: float | None   # bytes; None: not known (CPU-only study)

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.optimizer + self.activations
                + self.loss_gradient)

    @property
    def usable(self) -> float | None:
        if not self.gpu_memory:
            return None
        return self.gpu_memory * (1 - FRAGMENTATION) - CONTEXT_GIB * GIB

    @property
    def fits(self) -> bool:
        return self.usable is None or self.total <= self.usable

    def to_dict(self) -> dict:
        gib = lambda x: None if x is None else round(x / GIB, 2)  # noqa: E731
        return {"layout": dataclasses.asdict(self.layout), "stage": self.stage,
                "params_per_gpu": self.params, "weights_gib": gib(self.weights),
                "gradients_gib": gib(self.gradients), "optimizer_gib": gib(self.optimizer),
                "activations_gib": gib(self.activations),
                "loss_gradient_gib": gib(self.loss_gradient), "total_gib": gib(self.total),
                "gpu_gib": gib(self.gpu_memory), "usable_gib": gib(self.usable),
                "fits": self.fits}


def static_bytes(m: ModelConfig, lay: Layout, stage: int) -> tuple[int, float, float, float]:
    """(parameters, weight, gradient, optimizer-shard bytes) of a rank of ``stage``."""
    n = stage_params(m, lay.tp, lay.pp, stage)
    a = DTYPE_BYTES[lay.dtype]
    weights = float(n * a)
    if lay.fp8:  # FP8 copies of the linear weights of the FP8 layers, spread over the stages
        fp8_layers = max(0, m.num_layers - lay.fp8_bf16_layers)
        weights += 2 * layer_params(m, lay.tp)["linear"] * fp8_layers / lay.pp
    state = ADAM_BYTES + (MAIN_PARAM_BYTES if a != 4 else 0)
    optimizer = n * state / (lay.dp if lay.distributed_optimizer else 1)
    return n, weights, float(n * GRAD_BYTES), optimizer


def estimate(m: ModelConfig, lay: Layout, gpu_memory_gb: float | None = None) -> MemoryEstimate:
    """The most loaded GPU of ``lay`` (the pipeline stage with the largest total)."""
    best = None
    for stage in range(lay.pp):
        n, w, g, o = static_bytes(m, lay, stage)
        est = MemoryEstimate(lay, stage, n, w, g, o, _stage_activations(m, lay, stage),
                             loss_gradient_bytes(m, lay, stage),
                             gpu_memory_gb * GIB if gpu_memory_gb else None)
        if best is None or est.total > best.total:
            best = est
    return best


def suggestions(m: ModelConfig, lay: Layout, gpu_memory_gb: float, global_batch: int,
                max_tp: int) -> list[str]:
    """Layouts of the same GPUs that fit: more TP (DP shrinks), recompute, smaller micro
    batches; each with its total. Empty when nothing of these fits."""
    world = lay.tp * lay.pp * lay.dp
    tries = []
    tp = lay.tp * 2
    while tp <= max_tp and world % (tp * lay.pp) == 0:
        if _splits(m, tp, lay.pp):
            dp = world // (tp * lay.pp)
            tries.append((f"parallel.tp={tp}", dataclasses.replace(
                lay, tp=tp, dp=dp, sequence_parallel=lay.sequence_parallel or tp > 1,
                micro_batches=max(1, global_batch // (lay.micro_batch * dp)))))
        tp *= 2
    for mode in ("selective", "full"):
        if (lay.recompute, mode) in ((None, "selective"), (None, "full"), ("selective", "full")):
            tries.append((f"memory.recompute={mode}", dataclasses.replace(lay, recompute=mode)))
    mb = lay.micro_batch // 2
    while mb >= 1:
        tries.append((f"batch.micro_batch_size={mb}", dataclasses.replace(
            lay, micro_batch=mb, micro_batches=max(1, global_batch // (mb * lay.dp)))))
        mb //= 2
    out = []
    for what, alt in tries:
        if global_batch % (alt.micro_batch * alt.dp):  # the batch arithmetic must still hold
            continue
        est = estimate(m, alt, gpu_memory_gb)
        if est.fits:
            out.append(f"{what} ({est.total / GIB:.1f} GiB)")
    return out


def _splits(m: ModelConfig, tp: int, pp: int) -> bool:
    from megatron_cpt.errors import UsageError

    try:
        m.check_parallel(tp, pp)
    except UsageError:
        return False
    return True


def refusal(name: str, est: MemoryEstimate, suggested: list[str]) -> str:
    """The one-line message of a layout that does not fit."""
    fix = "; try " + " or ".join(suggested[:3]) if suggested else \
        "; no single change of TP, recompute or micro batch fits: add nodes or pipeline stages"
    return (f"{name}: {est.layout.describe()} needs {est.total / GIB:.1f} GiB per GPU "
            f"(weights {est.weights / GIB:.1f}, gradients {est.gradients / GIB:.1f}, optimizer "
            f"{est.optimizer / GIB:.1f}, activations {est.activations / GIB:.1f}, loss gradient "
            f"{est.loss_gradient / GIB:.1f}) but "
            f"{est.usable / GIB:.1f} of {est.gpu_memory / GIB:.0f} GiB are usable{fix}")


# -- checkpoints on disk ----------------------------------------------------------------------
def checkpoint_bytes_per_param(dtype: str) -> dict[str, int]:
    """Bytes per parameter of each checkpoint kind (evaluation: weights only)."""
    a = DTYPE_BYTES[dtype]
    return {"evaluation": a, "resume": a + MAIN_PARAM_BYTES + ADAM_BYTES}


def run_storage(params: int, dtype: str, saves: list[int], keep_last: int,
                grid: set[int], keep_optimizer_at_end: bool = True) -> dict:
    """Bytes a run's checkpoints occupy at its peak, replaying retention save by save:
    *before* every kept checkpoint holds optimizer state; *after* only the last ``keep_last``
    do and the evaluation grid keeps weights only. *At rest* (the finished run): the same, or
    with ``keep_optimizer_at_end`` false the grid plus the final checkpoint, weights only."""
    per = checkpoint_bytes_per_param(dtype)
    peak_before = peak_after = after = 0
    kept: list[int] = []
    for it in saves:
        kept = sorted(set(kept) | {it})
        last = kept[-keep_last:]
        kept = [k for k in kept if k in grid or k in last]
        before = len(kept) * per["resume"]
        after = sum(per["resume"] if k in last else per["evaluation"] for k in kept)
        peak_before, peak_after = max(peak_before, before), max(peak_after, after)
    grid_kept = sum(k in grid and k not in kept[-keep_last:] for k in kept)
    at_rest = after if keep_optimizer_at_end else \
        len({k for k in kept if k in grid} | set(saves[-1:])) * per["evaluation"]
    return {"checkpoints_kept": len(kept), "evaluation_checkpoints": grid_kept,
            "resume_checkpoints": len(kept) - grid_kept,
            "before_bytes": peak_before * params, "after_bytes": peak_after * params,
            "at_rest_bytes": at_rest * params}


def corpus_epochs(tokens_consumed: int, corpus_tokens: int) -> float:
    """Passes over a corpus that a budget makes (> 1: the corpus repeats)."""
    return tokens_consumed / corpus_tokens if corpus_tokens else float("inf")
