"""Typed training configuration: dataclasses loaded from YAML plus dotted overrides.

``TrainConfig.load(path, ["optimizer.lr=1e-4", ...])`` returns a validated config. Only
checks that need nothing but the YAML live here (:meth:`TrainConfig.check`); checks that
need the world size, the checkpoint or the data files live in :mod:`.preflight`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_cpt.config_loader import YamlDoc, build, read_yaml
from megatron_cpt.config_ranges import ranged
from megatron_cpt.errors import UsageError


FUSION_KEYS = ("gradient_accumulation_fusion", "rope_fusion", "cross_entropy_fusion",
               "bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion")


@dataclass
class ModelSection:
    pretrained: str = ""          # converted checkpoint folder (store format) loaded on the first launch
    attention_backend: str | None = None  # te | sdpa | local (None: te with Transformer Engine, else sdpa)
    # fused kernels (models/fusions.py): null = on where the kernel exists, true = required
    # (refused with exit 2 where missing), false = off
    gradient_accumulation_fusion: bool | None = None  # needs CUDA + APEX fused_weight_gradient_mlp_cuda
    rope_fusion: bool | None = None                   # needs Transformer Engine
    cross_entropy_fusion: str | None = None  # null (te with TE, native; bf16 runs only) | native | te | off
    bias_activation_fusion: bool | None = None  # SwiGLU via torch.compile: needs CUDA + Triton
    bias_dropout_fusion: bool | None = None     # bias-dropout-add via torch.compile: CUDA + Triton
    masked_softmax_fusion: bool | None = None   # attention_backend=local only: Megatron-LM's
                                                # compiled scaled_masked_softmax_cuda


@dataclass
class ParallelSection:
    tp: int = ranged(1, 1)
    pp: int = ranged(1, 1)
    sequence_parallel: bool = False   # with TP > 1: shard norms/dropout activations over TP
    distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False  # overlap DP grad reduce-scatter with the backward pass
    overlap_param_gather: bool = False  # overlap the distributed optimizer's param all-gather
                                        # with the next forward (needs distributed_optimizer)


@dataclass
class MemorySection:
    recompute: str | None = None      # null | selective (core attention) | full (whole layers)
    recompute_method: str = "uniform"  # full only: uniform | block
    recompute_num_layers: int = ranged(1, 1)    # full only: layers per recompute chunk (uniform) or count (block)


@dataclass
class PrecisionSection:
    dtype: str = "auto"           # auto: bfloat16 on GPU, float32 on CPU
    fp8: str | None = None        # null | hybrid | e4m3 (Transformer Engine only)
    fp8_recipe: str = "tensorwise"  # tensorwise | delayed | mxfp8 | blockwise
    fp8_bf16_first_layers: int = ranged(0, 0) # keep the first N transformer layers in bf16
    fp8_bf16_last_layers: int = ranged(0, 0)  # keep the last N transformer layers in bf16


@dataclass
class Prefix:
    prefix: str = ""
    weight: float = ranged(1.0, 0, lo_open=True)  # sampling ratio (data.train)
    name: str = ""


@dataclass
class DataSection:
    train: list[Prefix] = field(default_factory=list)
    valid: list[Prefix] = field(default_factory=list)   # one per domain + a general one
    seq_length: int = ranged(4096, 1)
    cache_dir: str = ""           # default: RUN/data_cache
    check_hashes: bool = True     # sha256 of .bin/.idx against the manifest


@dataclass
class BatchSection:
    micro_batch_size: int = ranged(1, 1)
    global_batch_size: int = ranged(8, 1)


@dataclass
class OptimizerSection:
    lr: float = ranged(3e-5, 0, lo_open=True)
    min_lr: float = ranged(3e-6, 0)
    weight_decay: float = ranged(0.1, 0)
    adam_beta1: float = ranged(0.9, 0, 1, hi_open=True)
    adam_beta2: float = ranged(0.95, 0, 1, hi_open=True)
    adam_eps: float = ranged(1e-8, 0, lo_open=True)
    clip_grad: float = ranged(1.0, 0)   # 0: no clipping


@dataclass
class ScheduleSection:
    warmup_fraction: float = ranged(0.01, 0, 1)    # of the run's iterations
    decay_style: str = "cosine"       # cosine | linear | WSD | constant
    wsd_decay_fraction: float = ranged(0.1, 0, 1)  # WSD: final fraction of iterations spent decaying
    wsd_decay_style: str = "linear"   # linear | cosine | exponential | minus_sqrt


@dataclass
class BudgetSection:
    tokens: float | None = ranged(None, 0, lo_open=True)  # exactly one of tokens / flops / iterations
    flops: float | None = ranged(None, 0, lo_open=True)
    iterations: int | None = ranged(None, 1)


@dataclass
class CheckpointSection:
    every_tokens: float | None = ranged(None, 0, lo_open=True) # save every N tokens (rounded up to whole iterations)
    keep_last: int = ranged(2, 1)                # plus every checkpoint on the evaluation grid
    keep_every_tokens: float | None = ranged(None, 0, lo_open=True) # evaluation grid: keep checkpoints at multiples of this
    save_at_end: bool = True
    # when the budget is spent, keep the optimizer state of the last keep_last checkpoints
    # (true: the run can be extended later) or drop it (false: every kept checkpoint becomes
    # weights-only; a relaunch says the run is complete; torchtitan's last_save_model_only)
    keep_optimizer_at_end: bool = True
    async_save: bool = False           # write in the background (Megatron-core async save); the loop
                                       # blocks only for the host copy; commit when all ranks finished
    fully_parallel: bool = False       # every DP rank writes / reads its share (Megatron-core's
                                       # FullyParallelSave/LoadStrategyWrapper over the DP group)
    # distributed-optimizer state layout in each checkpoint (megatron-core's sharding types):
    # dp_reshardable = each DP rank writes its own shard; resumes at any DP, same TP/PP.
    # fully_reshardable = gathered over DP into per-parameter tensors at save; resumes at any
    # TP/PP/DP (costs a DP all-gather and more save time; docs/training.md "Layout changes")
    optimizer_format: str = "dp_reshardable"


OPTIMIZER_FORMATS = ("dp_reshardable", "fully_reshardable")
TRACKING_SCHEMES = ("file", "http", "https", "databricks", "sqlite", "postgresql", "mysql")
LAYOUT_KEYS = ("tp", "pp", "sequence_parallel")  # parallel.* keys a resume may change


@dataclass
class ValidationSection:
    """Validation loss on data.valid during training (lm-eval scoring is `eval run`)."""

    interval_tokens: float | None = ranged(None, 0, lo_open=True) # validation loss every N tokens (None: only at the end)
    iters: int = ranged(4, 1)                       # micro batches per validation prefix
    at_end: bool = True


WANDB_MODES = ("online", "offline")


@dataclass
class WandbSection:
    """Weights & Biases (training/tracking.py): off while ``project`` is empty."""

    project: str = ""
    entity: str | None = None
    group: str | None = None       # the grid sets the study name
    mode: str = "online"           # online | offline (no internet: `wandb sync` later)


@dataclass
class MlflowSection:
    """MLflow (training/tracking.py): off while ``tracking_uri`` is empty."""

    tracking_uri: str = ""         # file:///abs/path (local store) | http(s)://server | databricks
    experiment: str = "megatron-cpt"  # the grid sets the study name


@dataclass
class LoggingSection:
    interval: int = ranged(1, 1)
    tensorboard: bool = True
    wandb: WandbSection = field(default_factory=WandbSection)
    mlflow: MlflowSection = field(default_factory=MlflowSection)
    tags: dict[str, str] = field(default_factory=dict)  # tracker tags/params (grid: size, domain, kind)
    mfu_peak_tflops: float = ranged(989.0, 0, lo_open=True)   # per-GPU dense bf16 peak used for MFU (H100 SXM)
    log_sample_ids: bool = False      # write samples.jsonl (which samples each step consumed)
    straggler_factor: float = ranged(1.5, 1, lo_open=True)    # a rank this many times slower than the median rank...
    straggler_intervals: int = ranged(3, 1)     # ...at this many logged steps in a row: a straggler event


@dataclass
class TrainSection:
    seed: int = ranged(1234, 0, 2**32 - 1)
    exit_before_walltime_min: float = ranged(0.0, 0) # save and exit this long before the SLURM time limit
    stop_after_iterations: int | None = ranged(None, 1) # run at most N iterations per launch, then save + exit for requeue
    on_nonfinite: str = "stop"     # NaN/Inf loss or grad norm: stop (exit 3) | skip (drop the update)
    max_skipped_steps: int = ranged(3, 0)    # skip: stop (exit 3) once a run has skipped more steps than this
    spike_factor: float | None = ranged(None, 1, lo_open=True) # a `spike` event when loss > factor x mean of the last 50
    # hang watchdog: no step or save completed for this long -> stacks in RUN/hang/, exit 4 (0: off)
    hang_timeout_min: float = ranged(10.0, 0)
    # torch.distributed timeout of every collective: above the longest checkpoint save and
    # above hang_timeout_min (so the watchdog reports a hang before a collective times out)
    collective_timeout_min: float = ranged(15.0, 0, lo_open=True)
    gc_interval: int | None = ranged(100, 0) # automatic GC off in steps, collect every N + at checkpoints/validation; null: Python's GC


@dataclass
class TrainConfig:
    run_dir: str = ""
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    memory: MemorySection = field(default_factory=MemorySection)
    data: DataSection = field(default_factory=DataSection)
    batch: BatchSection = field(default_factory=BatchSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    budget: BudgetSection = field(default_factory=BudgetSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    train: TrainSection = field(default_factory=TrainSection)

    # -- loading --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], doc: YamlDoc | None = None) -> "TrainConfig":
        if "eval" in (data or {}):
            msg = ("the training config section `eval:` is now called `validation:` "
                   "(validation loss settings); rename it (overrides: validation.KEY=...)")
            raise doc.error(("eval",), msg) if doc is not None else UsageError(msg)
        return build(cls, data or {}, doc)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = (),
             origin: str = "command line") -> "TrainConfig":
        """``origin`` names where ``overrides`` came from in errors about their values."""
        doc = read_yaml(path, "config")
        if not isinstance(doc.data, dict):
            raise doc.error((), "a training config must be a mapping of sections")
        for item in overrides:
            apply_override(doc, item, origin)
        cfg = cls.from_dict(doc.data, doc)
        cfg.resolve_paths(Path(path).parent)
        cfg.check()
        return cfg

    def resolve_paths(self, base: Path) -> None:
        """Relative paths in the YAML are relative to the YAML file's folder."""
        def res(p: str) -> str:
            return str((base / p).resolve()) if p and not Path(p).is_absolute() else p
        self.run_dir = res(self.run_dir)
        self.model.pretrained = res(self.model.pretrained)
        self.data.cache_dir = res(self.data.cache_dir)
        for p in self.data.train + self.data.valid:
            p.prefix = res(p.prefix)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def result_hash(self) -> str:
        """Hash of every setting that changes the trained weights (not logging, retention,
        walltime or paths of caches): a run folder refuses a config with another hash."""
        d = self.to_dict()
        for k in ("logging", "validation", "run_dir"):
            d.pop(k)
        d["checkpoint"] = {}
        d["train"].pop("exit_before_walltime_min")
        d["train"].pop("stop_after_iterations")
        d["train"].pop("on_nonfinite")  # policies: they act only when a step already failed
        d["train"].pop("max_skipped_steps")
        d["train"].pop("spike_factor")
        d["train"].pop("hang_timeout_min")
        d["train"].pop("collective_timeout_min")
        d["train"].pop("gc_interval")
        for key in FUSION_KEYS:
            if d["model"][key] is None:  # auto: keeps the hash of configs written before the key
                d["model"].pop(key)
        d["data"].pop("cache_dir")
        d["data"].pop("check_hashes")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def with_layout(self, parallel: dict) -> "TrainConfig":
        """A copy with the layout keys (``LAYOUT_KEYS``) taken from ``parallel``: the hash of
        ``cfg.with_layout(old)`` equals the old run's when only TP/PP/SP changed."""
        new = dataclasses.replace(self, parallel=dataclasses.replace(self.parallel))
        for key in LAYOUT_KEYS:
            if key in parallel:
                setattr(new.parallel, key, parallel[key])
        return new

    # -- checks that need only the YAML ------------------------------------------------------
    def check(self) -> None:
        """Checks across fields and of names; each number's own range is declared with its
        field (``ranged``) and checked by the loader."""
        if not self.run_dir:
            raise UsageError("run_dir is not set; add `run_dir: PATH` or run_dir=PATH")
        if not self.model.pretrained:
            raise UsageError("model.pretrained is not set; point it at a converted checkpoint "
                             "(`megatron-cpt convert hf-to-mcore`)")
        if not self.data.train:
            raise UsageError("data.train is empty; list at least one {prefix, weight}")
        b = self.budget
        given = [k for k in ("tokens", "flops", "iterations") if getattr(b, k) is not None]
        if len(given) != 1:
            raise UsageError(f"set exactly one of budget.tokens, budget.flops, budget.iterations "
                             f"(got {given or 'none'})")
        if self.schedule.decay_style not in ("cosine", "linear", "WSD", "constant"):
            raise UsageError(f"schedule.decay_style {self.schedule.decay_style!r} unknown; "
                             "choose cosine, linear, WSD or constant")
        if self.precision.dtype not in ("auto", "float32", "bfloat16"):
            raise UsageError(f"precision.dtype {self.precision.dtype!r} unknown; "
                             "choose auto, float32 or bfloat16")
        if self.precision.fp8 not in (None, "hybrid", "e4m3"):
            raise UsageError(f"precision.fp8 {self.precision.fp8!r} unknown; choose null, hybrid or e4m3")
        if self.precision.fp8_recipe not in ("tensorwise", "delayed", "mxfp8", "blockwise"):
            raise UsageError(f"precision.fp8_recipe {self.precision.fp8_recipe!r} unknown; "
                             "choose tensorwise, delayed, mxfp8 or blockwise")
        if self.memory.recompute not in (None, "selective", "full"):
            raise UsageError(f"memory.recompute {self.memory.recompute!r} unknown; "
                             "choose null, selective or full")
        if self.memory.recompute_method not in ("uniform", "block"):
            raise UsageError(f"memory.recompute_method {self.memory.recompute_method!r} unknown; "
                             "choose uniform or block")
        if self.parallel.overlap_param_gather and not self.parallel.distributed_optimizer:
            raise UsageError("parallel.overlap_param_gather needs parallel.distributed_optimizer=true")
        if self.model.cross_entropy_fusion not in (None, "native", "te", "off"):
            raise UsageError(f"model.cross_entropy_fusion {self.model.cross_entropy_fusion!r} unknown; "
                             "choose null (auto), native, te or off")
        if self.train.on_nonfinite not in ("stop", "skip"):
            raise UsageError(f"train.on_nonfinite {self.train.on_nonfinite!r} unknown; "
                             "choose stop or skip")
        self._check_health()
        if self.checkpoint.optimizer_format not in OPTIMIZER_FORMATS:
            raise UsageError(f"checkpoint.optimizer_format {self.checkpoint.optimizer_format!r} "
                             f"unknown; choose {' or '.join(OPTIMIZER_FORMATS)}")
        names = [p.name or Path(p.prefix).name for p in self.data.valid]
        if len(set(names)) != len(names):
            raise UsageError(f"data.valid names must be unique (got {names}); set name: per prefix")

    def _check_health(self) -> None:
        t = self.train
        if t.hang_timeout_min and t.hang_timeout_min >= t.collective_timeout_min:
            raise UsageError(f"train.hang_timeout_min ({t.hang_timeout_min:g}) must be below "
                             f"train.collective_timeout_min ({t.collective_timeout_min:g}), or a "
                             "hung collective times out before the watchdog reports it")
        self._check_tracking()

    def _check_tracking(self) -> None:
        lg = self.logging
        if lg.wandb.mode not in WANDB_MODES:
            raise UsageError(f"logging.wandb.mode {lg.wandb.mode!r} unknown; choose online or offline")
        if lg.wandb.project and ("/" in lg.wandb.project or len(lg.wandb.project) > 128):
            raise UsageError(f"logging.wandb.project {lg.wandb.project!r} must be a name of at most "
                             "128 characters without '/'")
        uri = lg.mlflow.tracking_uri
        if uri and ":" in uri and uri.split(":", 1)[0] not in TRACKING_SCHEMES:
            raise UsageError(f"logging.mlflow.tracking_uri {uri!r}: scheme unknown; use "
                             f"{', '.join(s + ':' for s in TRACKING_SCHEMES)} or a path")
        if uri and not lg.mlflow.experiment:
            raise UsageError("logging.mlflow.experiment is empty; name the MLflow experiment")


def apply_override(doc: YamlDoc, item: str, origin: str = "command line") -> None:
    """``a.b.c=value`` with ``value`` parsed as YAML (numbers, lists, null...); an error in
    the value later names this argument, not the YAML line it replaced."""
    if "=" not in item:
        raise UsageError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    doc.override(tuple(key.strip().split(".")), value, f"{origin} `{item}`")
