"""Preflight: every check that can fail before a rank allocates a tensor; each raises a
one-line :class:`UsageError` (exit code 2). Produces the :class:`RunPlan` the loop runs."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from megatron_cpt.errors import UsageError
from megatron_cpt.run_folder import RunFolder
from megatron_cpt.training import budget as budget_mod
from megatron_cpt.training import checkpointing, lease
from megatron_cpt.training.config import TrainConfig
from megatron_cpt.training.data import check_prefix


@dataclass
class RunPlan:
    """What one launch runs: the config plus everything derived from the world size, the
    checkpoint and the data."""

    cfg: TrainConfig
    model: object           # ModelConfig
    world_size: int
    dp: int
    accumulation: int       # micro batches per DP rank per step
    budget: budget_mod.Budget
    keep_iterations: set
    validation_every_iters: int
    dtype: str               # float32 | bfloat16
    eod_id: int
    vocab_size: int
    config_hash: str
    valid_names: list
    resume: checkpointing.Resume = None  # fresh start or the checkpoint this launch resumes
    code_changed: str | None = None      # set by the loop when a resume runs different code
    layout: checkpointing.Layout = None  # TP/PP/DP of this launch (checkpoint metadata, run.json)


def world_size_from_env() -> int:
    env = os.environ
    return int(env.get("WORLD_SIZE") or env.get("SLURM_NTASKS") or 1)


def check_run_dir(cfg: TrainConfig, config_hash: str, force: bool) -> None:
    lease.check_free(RunFolder(cfg.run_dir))
    info = RunFolder(cfg.run_dir).run_info()
    if info is not None and not force:
        old = info.get("config_hash")
        if old != config_hash and not _layout_only_change(cfg, old):
            raise UsageError(f"run folder {cfg.run_dir} was created by a different config "
                             f"(hash {old}, this one {config_hash}); use another run_dir or pass "
                             "--force to continue it with this config")


def _layout_only_change(cfg: TrainConfig, old_hash: str | None) -> bool:
    """Whether the run folder's config differs from ``cfg`` only in the layout keys (TP, PP,
    sequence parallelism): a resume on another layout, which checkpointing decides."""
    try:
        old = RunFolder(cfg.run_dir).config_dict().get("parallel") or {}
    except UsageError:
        return False
    return cfg.with_layout(old).result_hash() == old_hash


def resolve_dtype(cfg: TrainConfig, cuda: bool) -> str:
    if cfg.precision.dtype == "auto":
        return "bfloat16" if cuda else "float32"
    return cfg.precision.dtype


def check_layout(cfg: TrainConfig, model, world: int) -> tuple[int, int]:
    """Data-parallel size and gradient accumulation steps of ``world`` ranks; refuses a layout
    the launch cannot run. ``plan`` runs it too, so it never prices a run ``train`` refuses."""
    p, b = cfg.parallel, cfg.batch
    model.check_parallel(p.tp, p.pp)
    if world % (p.tp * p.pp):
        raise UsageError(f"TP x PP = {p.tp} x {p.pp} = {p.tp * p.pp} does not divide the world "
                         f"size {world}; launch a multiple of {p.tp * p.pp} processes")
    dp = world // (p.tp * p.pp)
    if b.global_batch_size % (b.micro_batch_size * dp):
        raise UsageError(f"global_batch_size {b.global_batch_size} != micro_batch_size "
                         f"{b.micro_batch_size} x DP {dp} x accumulation steps; make it a "
                         f"multiple of {b.micro_batch_size * dp}")
    if cfg.data.seq_length > model.max_position_embeddings:
        raise UsageError(f"data.seq_length {cfg.data.seq_length} exceeds the model's "
                         f"max_position_embeddings {model.max_position_embeddings}")
    return dp, b.global_batch_size // (b.micro_batch_size * dp)


def _precision(cfg: TrainConfig, model) -> str:
    """The training dtype; refuses what this machine's kernels cannot run."""
    import torch

    from megatron_cpt.models.qwen2 import BuildOptions, resolve_attention_backend, \
        transformer_engine_available

    cuda = torch.cuda.is_available()
    dtype = resolve_dtype(cfg, cuda)
    backend = resolve_attention_backend(BuildOptions(attention_backend=cfg.model.attention_backend,
                                                     use_te=None if cuda else False))
    if cfg.parallel.sequence_parallel and cfg.parallel.tp > 1 and backend != "te":
        raise UsageError(f"parallel.sequence_parallel needs the Transformer Engine layer spec, but "
                         f"this run uses the local spec (attention_backend={backend}), whose "
                         "RMSNorm does not support it; set parallel.sequence_parallel=false"
                         + ("" if transformer_engine_available() else
                            " or install the `gpu` extra"))
    if cfg.precision.fp8 and not transformer_engine_available():
        raise UsageError(f"precision.fp8={cfg.precision.fp8} needs Transformer Engine, which does "
                         "not import here; install the `gpu` extra or set precision.fp8=null")
    if cfg.precision.fp8 and dtype != "bfloat16":
        raise UsageError("FP8 training needs precision.dtype bfloat16 (or auto on GPU)")
    if cfg.precision.fp8_bf16_first_layers + cfg.precision.fp8_bf16_last_layers > model.num_layers:
        raise UsageError("precision.fp8_bf16_first_layers + fp8_bf16_last_layers exceeds the layers")
    _check_transformer_config(cfg, model, dtype, cuda)
    return dtype


def _check_transformer_config(cfg: TrainConfig, model, dtype: str, cuda: bool) -> None:
    """Build the very ``TransformerConfig`` the launch will build (no tensors): the fusions
    are resolved (a fusion asked for whose kernel is missing is refused) and Megatron-core's
    own validation runs now, not after the job got its GPUs."""
    import torch

    from megatron_cpt.models.qwen2 import transformer_config
    from megatron_cpt.training.model_options import build_options

    opts = build_options(cfg, model, torch.bfloat16 if dtype == "bfloat16" else torch.float32, cuda)
    try:
        transformer_config(model, opts)
    except UsageError:
        raise
    except (AssertionError, ValueError, TypeError, ImportError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UsageError(f"Megatron-core refuses this model configuration: {first}; change the "
                         "model / precision / memory / parallel settings it names") from exc


def _schedule(cfg: TrainConfig, model) -> tuple[budget_mod.Budget, set, int]:
    """The budget, the checkpoints kept for evaluation and the validation interval (iterations)."""
    bud = budget_mod.compute_budget(
        model, cfg.data.seq_length, cfg.batch.global_batch_size, tokens=cfg.budget.tokens,
        flops=cfg.budget.flops, iterations=cfg.budget.iterations,
        checkpoint_every_tokens=cfg.checkpoint.every_tokens, save_at_end=cfg.checkpoint.save_at_end)
    n = bud.iterations
    warm = round(cfg.schedule.warmup_fraction * n)
    if cfg.schedule.decay_style != "constant" and warm >= n:
        raise UsageError(f"warmup ({warm} iterations) must be shorter than the run ({n})")
    keep_every = budget_mod.every_iters(cfg.checkpoint.keep_every_tokens, bud.tokens_per_iteration, n) \
        if cfg.checkpoint.keep_every_tokens else None
    keep = {i for i in bud.checkpoint_iterations if keep_every and i % keep_every == 0}
    valid_every = budget_mod.every_iters(cfg.validation.interval_tokens, bud.tokens_per_iteration, n)
    return bud, keep, valid_every


def _hashing_rank() -> bool:
    """Only global rank 0 hashes the data (the others check sizes): one read per launch, and
    none once the prefix carries a verified stamp (data_prep.manifest.verify_prefix)."""
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0) == 0


def _check_data(cfg: TrainConfig, tok_dir: Path) -> list[dict]:
    """Manifests of the training then the validation prefixes, each checked against the
    model's tokenizer and long enough for one sequence."""
    seq, manifests = cfg.data.seq_length, []
    hashes = cfg.data.check_hashes and _hashing_rank()
    for pre in cfg.data.train:
        manifests.append(check_prefix(pre.prefix, tok_dir, hashes))
    for pre in cfg.data.valid:
        man = check_prefix(pre.prefix, tok_dir, hashes)
        name = pre.name or Path(pre.prefix).name
        if man.get("documents", 0) < 1 or man.get("tokens", 0) < seq + 1:
            raise UsageError(f"validation prefix {name!r} holds {man.get('tokens', 0)} tokens in "
                             f"{man.get('documents', 0)} documents: fewer than one sequence of "
                             f"{seq + 1}; the validation split would be empty")
        manifests.append(man)
    for pre, man in zip(cfg.data.train, manifests):
        if man.get("documents", 0) < 1 or man.get("tokens", 0) < seq + 1:
            raise UsageError(f"training prefix {pre.prefix} holds fewer than {seq + 1} tokens")
    return manifests


def prepare(cfg: TrainConfig, world_size: int | None = None, force: bool = False,
            check_data: bool = True, resume_from: str | None = None) -> RunPlan:
    """Every check, in the order a user fixes them; the plan of the launch."""
    from megatron_cpt.checkpoint import store

    world = world_size or world_size_from_env()
    ckpt = Path(cfg.model.pretrained)
    model = store.read_model_config(ckpt)
    dp, accumulation = check_layout(cfg, model, world)
    dtype = _precision(cfg, model)
    bud, keep, valid_every = _schedule(cfg, model)
    tok_dir = ckpt / store.TOKENIZER
    if not tok_dir.is_dir():
        raise UsageError(f"{tok_dir} not found; the checkpoint's tokenizer folder is missing")
    manifests = _check_data(cfg, tok_dir) if check_data else []
    eod = (manifests[0]["tokenizer"]["eod_id"] if manifests else 0)
    vocab = (manifests[0]["tokenizer"]["vocab_size"] if manifests else model.vocab_size)
    if vocab > model.vocab_size:
        raise UsageError(f"the data's tokenizer has {vocab} tokens but the model only "
                         f"{model.vocab_size} embedding rows")
    h = cfg.result_hash()
    check_run_dir(cfg, h, force)
    layout = checkpointing.Layout.of(cfg.parallel.tp, cfg.parallel.pp, dp,
                                     cfg.parallel.overlap_grad_reduce)
    resume = checkpointing.plan_resume(Path(cfg.run_dir), world, resume_from, layout)
    if resume.complete and resume.iteration < bud.iterations:
        raise UsageError(f"{resume.checkpoint} ended the run at iteration {resume.iteration} and "
                         f"its optimizer state was dropped (checkpoint.keep_optimizer_at_end: "
                         f"false), so the run cannot go on to {bud.iterations}; start a new run "
                         f"with model.pretrained={resume.checkpoint}")
    names = [pre.name or Path(pre.prefix).name for pre in cfg.data.valid]
    return RunPlan(cfg, model, world, dp, accumulation, bud, keep, valid_every, dtype, eod, vocab,
                   h, names, resume, layout=layout)
