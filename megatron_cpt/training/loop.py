"""The training loop, on Megatron-core primitives (DDP, distributed optimizer,
OptimizerParamScheduler, pipeline schedules). :func:`train` reads top to bottom:

    plan = preflight.prepare(cfg)         # every check, no tensors
    init distributed; record the run folder (config.yaml, run.json)
    launch = Launch(plan, ...)            # model: pretrained (first launch) or resumed; data
    run_steps(launch, stop):              # per iteration:
        forward_backward                  #   one all-reduce: loss + stop flag
        non-finite loss -> save the last good iteration, exit EXIT_NONFINITE
        optimizer_step                    #   log; validation loss; checkpoint
        stop_early -> save, exit EXIT_REQUEUE (launchers requeue the job)
    launch.finish(code)                   # final validation + checkpoint, exit_status.json
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_cpt import run_folder as rf
from megatron_cpt.run_folder import RunFolder
from megatron_cpt.training import checkpointing, data, fault_hooks, signals
from megatron_cpt.training.config import TrainConfig
from megatron_cpt.training.metrics import Metrics, event
from megatron_cpt.training.preflight import RunPlan, prepare

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _fp8_extra(cfg: TrainConfig, num_layers: int) -> dict:
    p = cfg.precision
    if not p.fp8:
        return {}
    extra = {"fp8": p.fp8, "fp8_recipe": p.fp8_recipe}
    if p.fp8_bf16_first_layers or p.fp8_bf16_last_layers:
        extra.update(first_last_layers_bf16=True, num_layers_at_start_in_bf16=p.fp8_bf16_first_layers,
                     num_layers_at_end_in_bf16=p.fp8_bf16_last_layers)
    return extra


def _memory_extra(cfg: TrainConfig) -> dict:
    """TransformerConfig fields for activation recomputation (``memory`` section)."""
    m = cfg.memory
    if m.recompute == "selective":
        return {"recompute_granularity": "selective"}
    if m.recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": m.recompute_method,
                "recompute_num_layers": m.recompute_num_layers}
    return {}


def build_training_state(cfg: TrainConfig, model_cfg, dtype: torch.dtype, iterations: int,
                         device, load_weights=None):
    """GPTModel (+ optional weight loading) wrapped in Megatron DDP, the Megatron optimizer and
    the LR schedule, as configured. Shared by the loop and benchmarks/throughput.py."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_cpt.models.qwen2 import BuildOptions, build_gpt_model

    opts = BuildOptions(tp=cfg.parallel.tp, pp=cfg.parallel.pp, params_dtype=dtype,
                        use_te=None if device.type == "cuda" else False,
                        sequence_parallel=cfg.parallel.sequence_parallel,
                        attention_backend=cfg.model.attention_backend,
                        # init_weights must stay True even though the checkpoint overwrites every
                        # weight: Megatron-core (0.16.1, tensor_parallel/layers.py) only marks
                        # weights as tensor-parallel inside its init functions; without the marks
                        # the grad norm (and clipping) ignores TP rank > 0 shards.
                        init_weights=True,
                        extra={**_fp8_extra(cfg, model_cfg.num_layers), **_memory_extra(cfg)})
    gpt = build_gpt_model(model_cfg, opts)
    if load_weights is not None:
        load_weights(gpt)
    par = cfg.parallel
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=par.overlap_grad_reduce,
        overlap_param_gather=par.overlap_param_gather and par.distributed_optimizer,
        use_distributed_optimizer=par.distributed_optimizer)
    model = DistributedDataParallel(config=gpt.config, ddp_config=ddp_cfg, module=gpt)
    o = cfg.optimizer
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        clip_grad=o.clip_grad, bf16=dtype == torch.bfloat16, params_dtype=dtype,
        use_distributed_optimizer=par.distributed_optimizer), [model])
    scheduler = make_scheduler(optimizer, cfg, iterations)
    gpt.config.finalize_model_grads_func = finalize_model_grads
    gpt.config.no_sync_func = model.no_sync
    if par.overlap_param_gather and par.distributed_optimizer:
        gpt.config.param_sync_func = model.start_param_sync
    return gpt, model, optimizer, scheduler


def _build(plan: RunPlan, device):
    from megatron_cpt.checkpoint import store

    cfg = plan.cfg
    resume = checkpointing.latest_checkpoint(Path(cfg.run_dir))
    load = None
    if resume is None:  # first launch: the converted pretrained weights, iteration 0
        load = lambda gpt: store.load_model_weights(gpt, Path(cfg.model.pretrained))  # noqa: E731
    gpt, model, optimizer, scheduler = build_training_state(
        cfg, plan.model, DTYPES[plan.dtype], plan.budget.iterations, device, load)
    return gpt, model, optimizer, scheduler, resume


def make_scheduler(optimizer, cfg: TrainConfig, n: int):
    """Megatron's OptimizerParamScheduler, stepped once per iteration: linear warmup from 0 over
    ``warmup_fraction * n`` iterations, then cosine / linear / constant decay to ``min_lr`` at
    ``n``, or WSD (constant, then the last ``wsd_decay_fraction * n`` iterations decay)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o, s = cfg.optimizer, cfg.schedule
    wsd = s.decay_style == "WSD"
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=round(s.warmup_fraction * n), lr_decay_steps=n,
        lr_decay_style=s.decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=n, wd_incr_style="constant",
        wsd_decay_steps=max(1, round(s.wsd_decay_fraction * n)) if wsd else None,
        lr_wsd_decay_style=s.wsd_decay_style if wsd else None)


def _forward_step(seq: int):
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        device = next(model.parameters()).device
        tokens = batch["tokens"].to(device)
        labels = batch["labels"].to(device)
        mask = batch["loss_mask"].to(device)
        pos = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
        output = model(tokens, pos, None, labels=labels)

        def loss_func(per_token):
            m = mask.reshape(-1)
            loss = (per_token.float().reshape(-1) * m).sum() / m.sum()
            return loss, {"loss": loss.detach().clone()}  # the schedule divides loss in place

        return output, loss_func
    return forward_step


def _mean_loss(losses: list[dict]) -> float:
    if not losses:
        return 0.0
    return float(torch.stack([d["loss"] for d in losses]).float().mean())



def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def record_run(plan: RunPlan) -> RunFolder:
    """Rank 0 records the config and the plan and removes half-written checkpoints; all wait."""
    run = RunFolder(plan.cfg.run_dir)
    if dist.get_rank() == 0:
        run.write_config(plan.cfg.to_dict())
        run.write_run_info({"config_hash": plan.config_hash, "world_size": plan.world_size,
                            "dp": plan.dp, "budget": plan.budget.to_dict()})
        removed = checkpointing.clean_stale(run.path)
        if removed:
            event(f"removed uncommitted checkpoint folders {removed}")
    dist.barrier()
    return run


class LaunchData:
    """The training set of the whole budget and one validation set per ``data.valid`` prefix."""

    def __init__(self, plan: RunPlan, run: RunFolder):
        cfg, b, seq = plan.cfg, plan.cfg.batch, plan.cfg.data.seq_length
        cache = cfg.data.cache_dir or str(run.data_cache)
        self.train = data.build_train_dataset(
            [p.prefix for p in cfg.data.train], [p.weight for p in cfg.data.train],
            plan.budget.iterations * b.global_batch_size, seq, cfg.train.seed, cache,
            plan.eod_id, plan.vocab_size)
        self.n_valid = cfg.validation.iters * b.micro_batch_size * plan.dp
        self.valid = [data.build_valid_dataset(p.prefix, self.n_valid, seq, cfg.train.seed, cache,
                                               plan.eod_id, plan.vocab_size)
                      for p in cfg.data.valid]


class SampleLog:
    """``logging.log_sample_ids``: the sample ids each step consumed, and the first step's
    tokens and labels, in ``debug/samples_dp<rank>.jsonl`` (first pipeline stage, TP rank 0)."""

    def __init__(self, run: RunFolder, enabled: bool, dp_rank: int):
        self._file = None
        if enabled:
            run.debug_dir.mkdir(exist_ok=True)
            self._file = open(run.sample_ids_path(dp_rank), "a")

    def write(self, iteration: int, micro: list[list[int]], batches: list[dict]) -> None:
        if self._file is None:
            return
        rec = {"iteration": iteration + 1, "ids": [i for m in micro for i in m]}
        if iteration == 0:
            rec["tokens"] = [bt["tokens"].tolist() for bt in batches]
            rec["labels"] = [bt["labels"].tolist() for bt in batches]
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class Launch:
    """One launch of a run: model state, data, metrics and the steps' bookkeeping."""

    def __init__(self, plan: RunPlan, run: RunFolder, device: torch.device):
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        cfg = plan.cfg
        self.plan, self.cfg, self.run, self.device = plan, cfg, run, device
        self.rank = dist.get_rank()
        self.gpt, self.model, self.optimizer, self.scheduler, resume = _build(plan, device)
        self.metrics = Metrics(run.path, enabled=self.rank == 0, tensorboard=cfg.logging.tensorboard)
        self.iteration = self._resume(resume)
        self.saved_at = self.iteration if resume is not None else -1
        self.launched = 0  # iterations run by this launch (train.stop_after_iterations)
        self.data = LaunchData(plan, run)
        self.dp_rank = ps.get_data_parallel_rank()
        tp0 = ps.get_tensor_model_parallel_rank() == 0
        self.last_stage_tp0 = ps.is_pipeline_last_stage() and tp0
        self.samples = SampleLog(run, cfg.logging.log_sample_ids and ps.is_pipeline_first_stage()
                                 and tp0, self.dp_rank)
        self.fb = get_forward_backward_func()
        self.forward_step = _forward_step(cfg.data.seq_length)
        self.flops_per_iter = plan.budget.flops_per_token * plan.budget.tokens_per_iteration
        self.nan_loss_at = fault_hooks.planned("nan_loss")

    def _resume(self, ckpt) -> int:
        """Load the latest checkpoint (later launches); returns the iteration to start at."""
        if ckpt is None:
            return 0
        start = checkpointing.load(ckpt, self.gpt, self.optimizer, self.scheduler)["iteration"]
        self.metrics.write({"kind": "event", "iteration": start, "event": "resume",
                            "details": ckpt.name})
        if self.rank == 0:
            event(f"resumed {ckpt} at iteration {start}")
        return start

    def _progress(self, it: int) -> dict:
        return {"tokens": it * self.plan.budget.tokens_per_iteration,
                "flops": it * self.flops_per_iter}

    def save(self, it: int) -> None:
        """Collective: one committed checkpoint of iteration ``it``."""
        b = self.cfg.batch
        meta = {"consumed_samples": it * b.global_batch_size, **self._progress(it),
                "config_hash": self.plan.config_hash, "dtype": self.plan.dtype,
                "source": {"type": "pretrained", "path": self.cfg.model.pretrained}}
        path = checkpointing.save(self.run.path, it, self.gpt, self.optimizer, self.scheduler, meta,
                                  Path(self.cfg.model.pretrained), self.cfg.checkpoint.keep_last,
                                  self.plan.keep_iterations)
        self.saved_at = it
        self.metrics.write({"kind": "event", "iteration": it, "event": "checkpoint",
                            "details": path.name})

    def validation_loss(self, it: int) -> None:
        """Mean loss on each validation set, written as ``valid`` records (collective)."""
        b = self.cfg.batch
        for name, ds in zip(self.plan.valid_names, self.data.valid):
            batches = data.iterate_micro_batches(ds, 0, self.data.n_valid, self.dp_rank,
                                                 self.plan.dp, b.micro_batch_size)
            with torch.no_grad():
                losses = self.fb(forward_step_func=self.forward_step, data_iterator=batches,
                                 model=[self.model], num_microbatches=self.cfg.validation.iters,
                                 seq_length=self.cfg.data.seq_length,
                                 micro_batch_size=b.micro_batch_size, forward_only=True)
            v = torch.tensor([_mean_loss(losses) if self.last_stage_tp0 else 0.0,
                              1.0 if self.last_stage_tp0 else 0.0], device=self.device)
            dist.all_reduce(v)
            self.metrics.write({"kind": "valid", "iteration": it, **self._progress(it),
                                "prefix": name, "loss": float(v[0] / v[1])})

    def forward_backward(self, stop: signals.StopFlag) -> tuple[float, bool]:
        """Gradients of the next iteration; returns the loss and whether any rank wants to stop."""
        it, b = self.iteration, self.cfg.batch
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        micro = data.micro_batch_indices(it, b.global_batch_size, self.dp_rank, self.plan.dp,
                                         b.micro_batch_size)
        batches = [data.collate(self.data.train, idx) for idx in micro]
        self.samples.write(it, micro, batches)
        losses = self.fb(forward_step_func=self.forward_step, data_iterator=iter(batches),
                         model=[self.model], num_microbatches=self.plan.accumulation,
                         seq_length=self.cfg.data.seq_length, micro_batch_size=b.micro_batch_size,
                         forward_only=False)
        # one all-reduce carries the loss, the stop flag and the walltime flag
        agree = torch.tensor([_mean_loss(losses) if self.last_stage_tp0 else 0.0,
                              1.0 if self.last_stage_tp0 else 0.0, stop.local_code()],
                             device=self.device, dtype=torch.float64)
        dist.all_reduce(agree)
        loss = float(agree[0] / agree[1])
        if it + 1 == self.nan_loss_at:  # tests only (fault_hooks)
            loss = float("nan")
        return loss, bool(agree[2] > 0)

    def stop_nonfinite(self, loss: float) -> int:
        """Keep the last good iteration (its checkpoint) and refuse to go on."""
        it = self.iteration
        msg = (f"non-finite loss {loss} at iteration {it + 1}; stopped with a checkpoint of "
               f"the last good iteration {it}; lower optimizer.lr or check the data")
        if self.saved_at != it:
            self.save(it)
        self.metrics.write({"kind": "event", "iteration": it, "event": "nonfinite", "details": msg})
        if self.rank == 0:
            event(msg)
        return rf.EXIT_NONFINITE

    def optimizer_step(self, loss: float, t0: float) -> None:
        """Apply the gradients, advance the schedule and log the iteration."""
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        self.iteration += 1
        self.launched += 1
        dt = time.perf_counter() - t0
        it, n, bud = self.iteration, self.plan.budget.iterations, self.plan.budget
        if it % self.cfg.logging.interval == 0 or it == n:
            tflops = self.flops_per_iter / dt / dist.get_world_size() / 1e12
            rec = {"kind": "train", "iteration": it, **self._progress(it), "loss": loss, "lr": lr,
                   "grad_norm": None if grad_norm is None else float(grad_norm),
                   "step_time_s": dt, "tokens_per_s": bud.tokens_per_iteration / dt,
                   "tflops_per_gpu": tflops, "mfu": tflops / self.cfg.logging.mfu_peak_tflops}
            self.metrics.write(rec)
            self.metrics.progress(rec, n)

    def _validation_due(self, it: int) -> bool:
        v = self.cfg.validation
        return bool(v.interval_tokens) and it % self.plan.validation_every_iters == 0

    def validate_and_checkpoint(self) -> None:
        """The validation loss and the checkpoint the plan asks for at this iteration."""
        it = self.iteration
        if self.data.valid and self._validation_due(it):
            self.validation_loss(it)
        if it in self.plan.budget.checkpoint_iterations:
            self.save(it)

    def stop_early(self, want_stop: bool, stop: signals.StopFlag) -> int | None:
        """Exit for requeue (``EXIT_REQUEUE``) with a checkpoint when a rank asked to stop
        (signal, walltime) or this launch ran ``train.stop_after_iterations``; None to go on."""
        it, stop_after = self.iteration, self.cfg.train.stop_after_iterations
        if it >= self.plan.budget.iterations:
            return None
        if not (want_stop or (stop_after and self.launched >= stop_after)):
            return None
        if self.saved_at != it:
            self.save(it)
        why = f"signal {stop.received}" if stop.received else \
            ("stop request from another rank or walltime" if want_stop else "stop_after_iterations")
        self.metrics.write({"kind": "event", "iteration": it, "event": "stop", "details": why})
        if self.rank == 0:
            event(f"stopping at iteration {it} ({why}); exit {rf.EXIT_REQUEUE} = requeue")
        return rf.EXIT_REQUEUE

    def finish(self, code: int) -> None:
        """Final validation and checkpoint of a finished budget; the verdict for launchers."""
        it = self.iteration
        if code == rf.EXIT_OK:
            if self.data.valid and self.cfg.validation.at_end and not self._validation_due(it):
                self.validation_loss(it)
            if self.cfg.checkpoint.save_at_end and self.saved_at != it:
                self.save(it)
            self.metrics.write({"kind": "event", "iteration": it, "event": "done", "details": ""})
        if self.rank == 0:  # the launcher reads this even where torchrun masks the exit code
            self.run.write_exit_status(code, it, self.plan.budget.iterations)
        dist.barrier()  # leave together: torchrun kills the others when one rank exits first

    def close(self) -> None:
        self.metrics.close()
        self.samples.close()


def run_steps(launch: Launch, stop: signals.StopFlag) -> int:
    """Iterate until the budget is spent or a stop condition holds; returns the exit code."""
    while launch.iteration < launch.plan.budget.iterations:
        t0 = time.perf_counter()
        loss, want_stop = launch.forward_backward(stop)
        if not math.isfinite(loss):
            return launch.stop_nonfinite(loss)
        launch.optimizer_step(loss, t0)
        launch.validate_and_checkpoint()
        code = launch.stop_early(want_stop, stop)
        if code is not None:
            return code
    return rf.EXIT_OK


def train(cfg: TrainConfig, force: bool = False) -> int:
    """One launch of a run (collective). Returns the exit code (:data:`run_folder.EXIT_CODES`)."""
    from megatron_cpt.runtime import init_distributed, shutdown

    plan = prepare(cfg, force=force)  # raises UsageError before any tensor exists
    init_distributed(cfg.parallel.tp, cfg.parallel.pp, seed=cfg.train.seed)
    launch = Launch(plan, record_run(plan), _device())
    stop = signals.StopFlag(cfg.train.exit_before_walltime_min).install()
    try:
        code = run_steps(launch, stop)
        launch.finish(code)
    finally:
        stop.uninstall()
        launch.close()
    shutdown()
    return code
