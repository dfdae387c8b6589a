"""Every check that can fail before a rank allocates a tensor; each raises a one-line
:class:`UsageError` (exit code 2). Produces the :class:`Plan` the loop runs."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from megatron_cpt.errors import UsageError
from megatron_cpt.training import budget as budget_mod
from megatron_cpt.training.config import TrainConfig
from megatron_cpt.training.data import check_prefix, tokenizer_sha256

RUN_JSON = "run.json"


@dataclass
class Plan:
    cfg: TrainConfig
    model: object           # ModelConfig
    world_size: int
    dp: int
    accumulation: int       # micro batches per DP rank per step
    budget: budget_mod.Budget
    keep_iterations: set
    eval_every_iters: int
    dtype: str               # float32 | bfloat16
    tokenizer_sha256: str
    eod_id: int
    vocab_size: int
    config_hash: str
    valid_names: list


def world_size_from_env() -> int:
    env = os.environ
    return int(env.get("WORLD_SIZE") or env.get("SLURM_NTASKS") or 1)


def check_run_dir(cfg: TrainConfig, config_hash: str, force: bool) -> None:
    run_json = Path(cfg.run_dir) / RUN_JSON
    if run_json.is_file() and not force:
        old = json.loads(run_json.read_text()).get("config_hash")
        if old != config_hash:
            raise UsageError(f"run folder {cfg.run_dir} was created by a different config "
                             f"(hash {old}, this one {config_hash}); use another run_dir or pass "
                             "--force to continue it with this config")


def resolve_dtype(cfg: TrainConfig, cuda: bool) -> str:
    if cfg.precision.dtype == "auto":
        return "bfloat16" if cuda else "float32"
    return cfg.precision.dtype


def prepare(cfg: TrainConfig, world_size: int | None = None, force: bool = False,
            check_data: bool = True) -> Plan:
    from megatron_cpt.checkpoint import store
    from megatron_cpt.models.qwen2 import transformer_engine_available

    world = world_size or world_size_from_env()
    p = cfg.parallel
    ckpt = Path(cfg.model.pretrained)
    model = store.read_model_config(ckpt)
    model.check_parallel(p.tp, p.pp)
    if world % (p.tp * p.pp):
        raise UsageError(f"TP x PP = {p.tp} x {p.pp} = {p.tp * p.pp} does not divide the world "
                         f"size {world}; launch a multiple of {p.tp * p.pp} processes")
    dp = world // (p.tp * p.pp)
    b = cfg.batch
    if b.global_batch_size % (b.micro_batch_size * dp):
        raise UsageError(f"global_batch_size {b.global_batch_size} != micro_batch_size "
                         f"{b.micro_batch_size} x DP {dp} x accumulation steps; make it a "
                         f"multiple of {b.micro_batch_size * dp}")
    accumulation = b.global_batch_size // (b.micro_batch_size * dp)
    seq = cfg.data.seq_length
    if seq > model.max_position_embeddings:
        raise UsageError(f"data.seq_length {seq} exceeds the model's max_position_embeddings "
                         f"{model.max_position_embeddings}")
    import torch
    cuda = torch.cuda.is_available()
    dtype = resolve_dtype(cfg, cuda)
    from megatron_cpt.models.qwen2 import BuildOptions, resolve_attention_backend

    resolve_attention_backend(BuildOptions(attention_backend=cfg.model.attention_backend))
    if cfg.parallel.sequence_parallel and cfg.parallel.tp > 1 and not transformer_engine_available():
        raise UsageError("parallel.sequence_parallel needs Transformer Engine (Megatron-core's "
                         "local RMSNorm does not support it); install the `gpu` extra or set "
                         "parallel.sequence_parallel=false")
    if cfg.precision.fp8 and not transformer_engine_available():
        raise UsageError(f"precision.fp8={cfg.precision.fp8} needs Transformer Engine, which does "
                         "not import here; install the `gpu` extra or set precision.fp8=null")
    from megatron_cpt.models import fusions

    fusions.resolve(cfg.model, dtype)  # refuses a fusion asked for whose kernel is missing
    if cfg.precision.fp8 and dtype != "bfloat16":
        raise UsageError("FP8 training needs precision.dtype bfloat16 (or auto on GPU)")
    if cfg.precision.fp8_bf16_first_layers + cfg.precision.fp8_bf16_last_layers > model.num_layers:
        raise UsageError("precision.fp8_bf16_first_layers + fp8_bf16_last_layers exceeds the layers")

    bud = budget_mod.compute_budget(
        model, seq, b.global_batch_size, tokens=cfg.budget.tokens, flops=cfg.budget.flops,
        iterations=cfg.budget.iterations, checkpoint_every_tokens=cfg.checkpoint.every_tokens,
        save_at_end=cfg.checkpoint.save_at_end)
    n = bud.iterations
    sched = cfg.schedule
    warm = round(sched.warmup_fraction * n)
    if sched.decay_style != "constant" and warm >= n:
        raise UsageError(f"warmup ({warm} iterations) must be shorter than the run ({n})")
    keep_every = budget_mod.every_iters(cfg.checkpoint.keep_every_tokens, bud.tokens_per_iteration, n) \
        if cfg.checkpoint.keep_every_tokens else None
    keep = {i for i in bud.checkpoint_iterations if keep_every and i % keep_every == 0}
    eval_every = budget_mod.every_iters(cfg.eval.interval_tokens, bud.tokens_per_iteration, n)

    tok_dir = ckpt / store.TOKENIZER
    tok_sha = tokenizer_sha256(tok_dir)
    manifests = []
    if check_data:
        for pre in cfg.data.train:
            manifests.append(check_prefix(pre.prefix, tok_dir, cfg.data.check_hashes))
        for pre in cfg.data.valid:
            man = check_prefix(pre.prefix, tok_dir, cfg.data.check_hashes)
            name = pre.name or Path(pre.prefix).name
            if man.get("documents", 0) < 1 or man.get("tokens", 0) < seq + 1:
                raise UsageError(f"validation prefix {name!r} holds {man.get('tokens', 0)} tokens in "
                                 f"{man.get('documents', 0)} documents: fewer than one sequence of "
                                 f"{seq + 1}; the validation split would be empty")
            manifests.append(man)
        for pre, man in zip(cfg.data.train, manifests):
            if man.get("documents", 0) < 1 or man.get("tokens", 0) < seq + 1:
                raise UsageError(f"training prefix {pre.prefix} holds fewer than {seq + 1} tokens")
    eod = (manifests[0]["tokenizer"]["eod_id"] if manifests else 0)
    vocab = (manifests[0]["tokenizer"]["vocab_size"] if manifests else model.vocab_size)
    if vocab > model.vocab_size:
        raise UsageError(f"the data's tokenizer has {vocab} tokens but the model only "
                         f"{model.vocab_size} embedding rows")
    h = cfg.result_hash()
    check_run_dir(cfg, h, force)
    names = [pre.name or Path(pre.prefix).name for pre in cfg.data.valid]
    return Plan(cfg, model, world, dp, accumulation, bud, keep, eval_every, dtype, tok_sha,
                eod, vocab, h, names)
