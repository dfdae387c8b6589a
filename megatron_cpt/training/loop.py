"""The training loop, on Megatron-core primitives (DDP, distributed optimizer,
OptimizerParamScheduler, pipeline schedules). :func:`train` reads top to bottom:

    plan = preflight.prepare(cfg)         # every check, no tensors; fresh / resume / refuse
    init distributed; record the run folder (config.yaml, run.json, exit_status "running")
    launch = Launch(plan, ...)            # model: pretrained (fresh start) or resumed; data
    run_steps(launch, stop):              # per iteration:
        forward_backward                  #   one all-reduce: loss + stop flag
        optimizer_step                    #   update only if loss and grad norm are finite;
                                          #   else skip it or stop (exit EXIT_NONFINITE, no
                                          #   checkpoint of non-finite weights); log
        validate_and_checkpoint           #   commit a finished async save; validate; save
        stop_early -> save, exit EXIT_REQUEUE (launchers requeue the job)
    launch.finish(code)                   # final validation + checkpoint, exit_status.json
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_cpt import provenance
from megatron_cpt import run_folder as rf
from megatron_cpt.run_folder import RunFolder
from megatron_cpt.training import checkpointing, data, fault_hooks, lease, nonfinite, signals
from megatron_cpt.training import startup_record, tracking
from megatron_cpt.training.health import RankHealth
from megatron_cpt.training.config import TrainConfig
from megatron_cpt.training.gc_policy import GCPolicy
from megatron_cpt.training.metrics import Metrics, event
from megatron_cpt.training.preflight import RunPlan, prepare
from megatron_cpt.training.watchdog import Watchdog

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_training_state(cfg: TrainConfig, model_cfg, dtype: torch.dtype, iterations: int,
                         device, load_weights=None):
    """GPTModel (+ optional weight loading) wrapped in Megatron DDP, the Megatron optimizer and
    the LR schedule, as configured. Shared by the loop and benchmarks/throughput.py."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_cpt.models.qwen2 import build_gpt_model
    from megatron_cpt.training.model_options import build_options

    opts = build_options(cfg, model_cfg, dtype, device.type == "cuda")
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


def _save_options(plan: RunPlan, lease_token: str | None) -> "checkpointing.SaveOptions":
    c = plan.cfg.checkpoint
    return checkpointing.SaveOptions(
        run_dir=Path(plan.cfg.run_dir), pretrained=Path(plan.cfg.model.pretrained),
        keep_last=c.keep_last, keep_iterations=plan.keep_iterations, async_save=c.async_save,
        fully_parallel=c.fully_parallel, lease_token=lease_token)


def _build(plan: RunPlan, device):
    from megatron_cpt.checkpoint import store

    cfg = plan.cfg
    resume = plan.resume.checkpoint  # decided (and checked) by preflight
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



def record_run(plan: RunPlan, startup: dict | None = None) -> RunFolder:
    """Rank 0 records the config, the plan, what is active (the startup record, printed
    once) and the code (noting a resume that runs other code), marks the launch running,
    removes half-written checkpoints and points ``latest`` at an explicit ``--resume-from``;
    all wait."""
    from megatron_cpt.runtime.distributed import placement

    run = RunFolder(plan.cfg.run_dir)
    where = placement()
    if dist.get_rank() == 0:
        code, before = provenance.provenance(), run.run_info() or {}
        changed = provenance.differences(before.get("provenance"), code)
        if changed and plan.resume.checkpoint is not None:
            plan.code_changed = "; ".join(changed)
        run.write_config(plan.cfg.to_dict())
        run.write_run_info({"config_hash": plan.config_hash, "world_size": plan.world_size,
                            "dp": plan.dp, "budget": plan.budget.to_dict(), "startup": startup,
                            "provenance": code, "layouts": _layout_history(plan, before),
                            "placement": where, tracking.RUN_ID_KEY: tracking.run_id(run)})
        run.write_running(plan.resume.iteration, plan.budget.iterations)
        if startup is not None:
            event(startup_record.format_record(startup))
        removed = checkpointing.clean_stale(run.path)
        if removed:
            event(f"removed uncommitted checkpoint folders {removed}")
        if plan.resume.explicit:
            checkpointing.point_latest(run.path, plan.resume.checkpoint.name)
    dist.barrier()
    return run


def _layout_history(plan: RunPlan, before: dict) -> list[dict]:
    """run.json ``layouts``: one entry per launch (the iteration it started at, TP/PP/DP/world,
    optimizer format); a resume on another layout appends a different one."""
    entry = {"iteration": plan.resume.iteration, **plan.layout.to_dict(),
             "optimizer_format": plan.cfg.checkpoint.optimizer_format}
    return list(before.get("layouts") or []) + [entry]


class LaunchData:
    """The training set of the whole budget and one validation set per ``data.valid`` prefix."""

    def __init__(self, plan: RunPlan, run: RunFolder):
        cfg, b, seq = plan.cfg, plan.cfg.batch, plan.cfg.data.seq_length
        cache = cfg.data.cache_dir or str(run.data_cache)
        self.train = data.build_train_dataset(
            [p.prefix for p in cfg.data.train], [p.weight for p in cfg.data.train],
            plan.budget.iterations * b.global_batch_size, seq, cfg.train.seed, cache,
            plan.eod_id, plan.vocab_size)
        if len(cfg.data.train) > 1 and dist.get_rank() == 0:  # a replay cell's proof of its mix
            from megatron_cpt.run_folder import write_json_atomic

            write_json_atomic(run.data_blend_path, data.blend_counts(
                self.train, [p.prefix for p in cfg.data.train], [p.weight for p in cfg.data.train],
                plan.budget.iterations * b.global_batch_size), indent=2)
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

    def __init__(self, plan: RunPlan, run: RunFolder, device: torch.device,
                 guard: lease.Guard | None = None):
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        cfg = plan.cfg
        self.plan, self.cfg, self.run, self.device = plan, cfg, run, device
        self.rank = dist.get_rank()
        self.gpt, self.model, self.optimizer, self.scheduler, resume = _build(plan, device)
        self.metrics = Metrics(run.path, enabled=self.rank == 0, tensorboard=cfg.logging.tensorboard)
        if guard is not None:
            self.metrics.before_write = guard.verify
        self.skipped = 0   # updates dropped by train.on_nonfinite=skip, over the whole run
        self.spikes = nonfinite.SpikeWatch(cfg.train.spike_factor)
        self.iteration = self._resume(resume)
        self.saved_at = self.iteration if resume is not None else -1
        self.metrics.start_tracking(cfg.logging, self.iteration)
        self.checkpointer = checkpointing.Checkpointer(
            _save_options(plan, guard.token if guard is not None else None))
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
        self.slow_from = fault_hooks.planned("slow_steps")
        self.gc_policy = GCPolicy(cfg.train.gc_interval)
        self._init_health(device)

    def _init_health(self, device: torch.device) -> None:
        """Per-rank step figures, the hang watchdog (armed by :func:`train`) and their
        test faults."""
        lg, world = self.cfg.logging, dist.get_world_size()
        self.health = RankHealth(lg.straggler_factor, lg.straggler_intervals, device)
        self.watchdog = Watchdog(self.run, self.rank, self.cfg.train.hang_timeout_min,
                                 self.plan.budget.iterations)
        finalize = self.gpt.config.finalize_model_grads_func

        def finalize_timed(*args, **kwargs):
            self.health.work_done()
            self.watchdog.phase("gradient reduction (finalize_model_grads)")
            return finalize(*args, **kwargs)
        self.gpt.config.finalize_model_grads_func = finalize_timed
        hang_at = fault_hooks.planned("hang")
        self.hang_at = hang_at if self.rank == world - 1 and not self.run.hang_dir.exists() else None
        self.slow = self.rank == fault_hooks.planned("slow_rank")

    def _resume(self, ckpt) -> int:
        """Load the latest checkpoint (later launches); returns the iteration to start at."""
        if ckpt is None:
            return 0
        meta = checkpointing.load(ckpt, self.gpt, self.optimizer, self.scheduler,
                                  self.plan.layout, self.cfg.train.seed,
                                  fully_parallel=self.cfg.checkpoint.fully_parallel)
        start, self.skipped = meta["iteration"], meta.get("skipped_steps", 0)
        self.metrics.write({"kind": "event", "iteration": start, "event": "resume",
                            "details": ckpt.name})
        self._log_layout_change(start, meta)
        if self.plan.code_changed:
            self.metrics.write({"kind": "event", "iteration": start, "event": "code_changed",
                                "details": self.plan.code_changed})
        if self.rank == 0:
            event(f"resumed {ckpt} at iteration {start}"
                  + (f" with different code: {self.plan.code_changed}" if self.plan.code_changed
                     else ""))
        return start

    def _log_layout_change(self, start: int, meta: dict) -> None:
        """A ``layout_change`` event (what was resharded, how the RNG states were restored)."""
        change = self.plan.resume.layout_change
        if change is None:
            return
        fmt = meta.get("optimizer_format", checkpointing.DP_RESHARDABLE)
        details = (f"{change}: model and {fmt} optimizer state resharded; "
                   f"{meta.get('rng') or 'RNG states restored exactly'}")
        self.metrics.write({"kind": "event", "iteration": start, "event": "layout_change",
                            "details": details})
        if self.rank == 0:
            event(f"layout change {details}")

    def _progress(self, it: int) -> dict:
        return {"tokens": it * self.plan.budget.tokens_per_iteration,
                "flops": it * self.flops_per_iter}

    def save(self, it: int) -> bool:
        """Collective: one checkpoint of iteration ``it`` (committed now, or by a later
        :meth:`saves_done` when ``checkpoint.async_save``); never of non-finite weights (then
        nothing is written, ``latest`` stays, and it returns False)."""
        if not nonfinite.weights_finite(self.gpt, self.device):
            self.metrics.write({"kind": "event", "iteration": it, "event": "nonfinite",
                                "details": f"non-finite weights: no checkpoint of iteration {it}"})
            return False
        self.gc_policy.at_sync_point()
        b = self.cfg.batch
        self.watchdog.phase(f"checkpoint save of iteration {it}")
        meta = {"consumed_samples": it * b.global_batch_size, **self._progress(it),
                "config_hash": self.plan.config_hash, "dtype": self.plan.dtype,
                "skipped_steps": self.skipped, "layout": self.plan.layout.to_dict(),
                "optimizer_format": self.cfg.checkpoint.optimizer_format,
                "source": {"type": "pretrained", "path": self.cfg.model.pretrained}}
        self.checkpointer.save(it, self.gpt, self.optimizer, self.scheduler, meta)
        self.saved_at = it
        self.watchdog.beat(it)
        self._log_commits()
        return True

    def saves_done(self, wait: bool) -> None:
        """Commit a background save whose writes finished on every rank (``wait``: block
        until it has; before a stop and at the exit). Collective; free when none is pending."""
        if self.checkpointer.pending is None:
            return
        if wait:
            self.watchdog.phase(f"async checkpoint write of iteration {self.checkpointer.pending}")
            self.checkpointer.wait()
            self.watchdog.beat(self.iteration)
        else:
            self.checkpointer.poll()
        self._log_commits()

    def _log_commits(self) -> None:
        for name in self.checkpointer.committed:
            self.metrics.write({"kind": "event", "iteration": self.iteration, "event": "checkpoint",
                                "details": name})
        self.checkpointer.committed.clear()

    def validation_loss(self, it: int) -> None:
        """Mean loss on each validation set, written as ``valid`` records (collective)."""
        self.gc_policy.at_sync_point()
        b = self.cfg.batch
        self.watchdog.phase(f"validation loss of iteration {it}")
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
        self.watchdog.beat(it)

    def forward_backward(self, stop: signals.StopFlag) -> tuple[float, bool]:
        """Gradients of the next iteration; returns the loss and whether any rank wants to stop."""
        it, b = self.iteration, self.cfg.batch
        self.health.start_step()
        self.watchdog.phase(f"forward/backward of iteration {it + 1}")
        if it + 1 == self.hang_at:  # tests only (fault_hooks)
            fault_hooks.hang_forever(f"hang@{self.hang_at}")
        if self.slow:
            time.sleep(fault_hooks.SLOW_S)
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        micro = data.micro_batch_indices(it, b.global_batch_size, self.dp_rank, self.plan.dp,
                                         b.micro_batch_size)
        batches = [data.collate(self.data.train, idx) for idx in micro]
        self.samples.write(it, micro, batches)
        fault_hooks.poison(self.gpt, "nan_weight", it + 1, self.rank)  # tests only
        losses = self.fb(forward_step_func=self.forward_step, data_iterator=iter(batches),
                         model=[self.model], num_microbatches=self.plan.accumulation,
                         seq_length=self.cfg.data.seq_length, micro_batch_size=b.micro_batch_size,
                         forward_only=False)
        fault_hooks.poison(self.gpt, "nan_grad", it + 1, self.rank)  # tests only
        # one all-reduce carries the loss, the stop flag and the walltime flag
        agree = torch.tensor([_mean_loss(losses) if self.last_stage_tp0 else 0.0,
                              1.0 if self.last_stage_tp0 else 0.0, stop.local_code()],
                             device=self.device, dtype=torch.float64)
        dist.all_reduce(agree)
        loss = float(agree[0] / agree[1])
        if it + 1 == self.nan_loss_at:  # tests only (fault_hooks)
            loss = float("nan")
        if self.slow_from is not None and it + 1 >= self.slow_from:
            time.sleep(1.0)
        return loss, bool(agree[2] > 0)

    def stop_nonfinite(self, what: str) -> int:
        """Refuse to go on; checkpoint the current weights only when they are finite on every
        rank (the update was never applied), else ``latest`` stays on the last committed one."""
        it = self.iteration
        if self.saved_at == it:
            kept = f"the checkpoint of iteration {it} is kept"
        elif self.save(it):
            kept = f"stopped with a checkpoint of the last good iteration {it}"
        else:
            kept = (f"the weights are non-finite, nothing saved; checkpoints/latest stays on "
                    f"{self.run.latest_name()}")
        msg = f"{what} at iteration {it + 1}; {kept}; lower optimizer.lr or check the data"
        self.metrics.write({"kind": "event", "iteration": it, "event": "nonfinite", "details": msg})
        if self.rank == 0:
            event(msg)
        return rf.EXIT_NONFINITE

    def skip_or_stop(self, what: str) -> int | None:
        """``train.on_nonfinite``: drop this update (its batch counts as consumed) and go on,
        or stop with exit 3 (``stop``, or more than ``max_skipped_steps`` skipped)."""
        t = self.cfg.train
        if t.on_nonfinite != "skip" or self.skipped >= t.max_skipped_steps:
            return self.stop_nonfinite(what)
        self.skipped += 1
        self.scheduler.step(increment=1)
        self.iteration += 1
        self.launched += 1
        self.watchdog.beat(self.iteration)  # a skipped step is progress, not a hang
        msg = f"{what}: update dropped ({self.skipped} of {t.max_skipped_steps} skips allowed)"
        self.metrics.write({"kind": "event", "iteration": self.iteration, "event": "skipped",
                            "details": msg})
        if self.rank == 0:
            event(f"iteration {self.iteration}: {msg}")
        return None

    def optimizer_step(self, loss: float, t0: float) -> int | None:
        """Apply the gradients if the loss and the grad norm are finite, advance the schedule
        and log the iteration; otherwise :meth:`skip_or_stop` (its exit code, or None)."""
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        if not math.isfinite(loss):
            return self.skip_or_stop(f"non-finite loss {loss}")
        self.watchdog.phase(f"optimizer step of iteration {self.iteration + 1}")
        applied, grad_norm = nonfinite.checked_step(self.optimizer, self.device)
        if not applied:
            return self.skip_or_stop(f"non-finite grad norm {grad_norm}")
        self.scheduler.step(increment=1)
        self.iteration += 1
        self.launched += 1
        self.gc_policy.step(self.iteration)  # inside the timed step: its pause is part of it
        dt = time.perf_counter() - t0
        it, n, bud = self.iteration, self.plan.budget.iterations, self.plan.budget
        self.watchdog.beat(it)
        mean = self.spikes.spike(loss)
        if mean is not None:
            self.metrics.write({"kind": "event", "iteration": it, "event": "spike",
                                "details": f"loss {loss:.4g} > {self.cfg.train.spike_factor} x "
                                           f"the recent mean {mean:.4g}"})
        if it % self.cfg.logging.interval == 0 or it == n:
            tflops = self.flops_per_iter / dt / dist.get_world_size() / 1e12
            health, stragglers = self.health.gather(dt)  # collective
            rec = {"kind": "train", "iteration": it, **self._progress(it), "loss": loss, "lr": lr,
                   "grad_norm": None if grad_norm is None else float(grad_norm),
                   "step_time_s": dt, "tokens_per_s": bud.tokens_per_iteration / dt,
                   "tflops_per_gpu": tflops, "mfu": tflops / self.cfg.logging.mfu_peak_tflops,
                   **health}
            self.metrics.write(rec)
            self.metrics.progress(rec, n)
            self.report_stragglers(it, stragglers)
        return None

    def report_stragglers(self, it: int, stragglers: list[tuple[int, str]]) -> None:
        for rank, details in stragglers:
            self.metrics.write({"kind": "event", "iteration": it, "event": "straggler",
                                "rank": rank, "details": details})
            if self.rank == 0:
                event(f"straggler: {details}")

    def _validation_due(self, it: int) -> bool:
        v = self.cfg.validation
        return bool(v.interval_tokens) and it % self.plan.validation_every_iters == 0

    def validate_and_checkpoint(self) -> None:
        """The validation loss and the checkpoint the plan asks for at this iteration."""
        it = self.iteration
        self.saves_done(wait=False)
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
        self.saves_done(wait=True)  # exit 42 only with the checkpoint committed
        why = f"signal {stop.received}" if stop.received else \
            ("stop request from another rank or walltime" if want_stop else "stop_after_iterations")
        self.metrics.write({"kind": "event", "iteration": it, "event": "stop", "details": why})
        if self.rank == 0:
            said = stop.describe() if stop.received else why
            kept = f"checkpoint {checkpointing.iter_name(it)} committed" if self.saved_at == it \
                else "no checkpoint of this iteration (non-finite weights)"
            event(f"stopping at iteration {it} ({said}); {kept}; exit {rf.EXIT_REQUEUE} = requeue "
                  "(relaunch the same command to resume)")
        return rf.EXIT_REQUEUE

    def finish(self, code: int) -> None:
        """Final validation and checkpoint of a finished budget; the verdict for launchers."""
        it = self.iteration
        if code == rf.EXIT_OK:
            if self.data.valid and self.cfg.validation.at_end and not self._validation_due(it):
                self.validation_loss(it)
            if self.cfg.checkpoint.save_at_end and self.saved_at != it:
                self.save(it)
        self.saves_done(wait=True)  # every exit path: no background write left uncommitted
        if code == rf.EXIT_OK and not self.cfg.checkpoint.keep_optimizer_at_end \
                and self.saved_at == it:
            dist.barrier()
            if self.rank == 0:
                checkpointing.drop_optimizer_state_at_end(self.run.path, it,
                                                          self.plan.keep_iterations)
        if code == rf.EXIT_OK:
            self.metrics.write({"kind": "event", "iteration": it, "event": "done", "details": ""})
        if self.rank == 0:  # the launcher reads this even where torchrun masks the exit code
            self.run.write_exit_status(code, it, self.plan.budget.iterations)
        dist.barrier()  # leave together: torchrun kills the others when one rank exits first

    def close(self, code: int = 0) -> None:
        self.metrics.close(code)
        self.samples.close()


def run_steps(launch: Launch, stop: signals.StopFlag) -> int:
    """Iterate until the budget is spent or a stop condition holds; returns the exit code."""
    while launch.iteration < launch.plan.budget.iterations:
        t0 = time.perf_counter()
        loss, want_stop = launch.forward_backward(stop)
        code = launch.optimizer_step(loss, t0)
        if code is not None:
            return code
        fault_hooks.crash_rank_if_planned(launch.iteration, launch.rank, dist.get_world_size())
        launch.validate_and_checkpoint()
        code = launch.stop_early(want_stop, stop)
        if code is not None:
            return code
    return rf.EXIT_OK


def _prepare(cfg: TrainConfig, force: bool, resume_from: str | None) -> RunPlan:
    """The plan, or the refusal, which also replaces a stale verdict in exit_status.json."""
    from megatron_cpt.errors import UsageError

    try:
        return prepare(cfg, force=force, resume_from=resume_from)
    except UsageError as exc:
        if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0 and _unleased(cfg):
            RunFolder(cfg.run_dir).write_refused(str(exc))
        raise


def _unleased(cfg: TrainConfig) -> bool:
    """A refused launch writes its verdict only where no live launch holds the folder."""
    from megatron_cpt.errors import UsageError

    try:
        lease.check_free(RunFolder(cfg.run_dir))
    except UsageError:
        return False
    return True


def train(cfg: TrainConfig, force: bool = False, resume_from: str | None = None) -> int:
    """One launch of a run (collective). Returns the exit code (:data:`run_folder.EXIT_CODES`)."""
    from megatron_cpt.runtime import cuda_connections, init_distributed, shutdown

    connections = cuda_connections.apply(cfg.parallel.tp, cfg.parallel.sequence_parallel)  # before CUDA
    plan = _prepare(cfg, force, resume_from)  # raises UsageError before any tensor exists
    if plan.resume.complete:
        return _already_complete(plan)
    startup = startup_record.build(cfg, plan.dtype, connections=connections)
    init_distributed(cfg.parallel.tp, cfg.parallel.pp, seed=cfg.train.seed,
                     timeout_min=cfg.train.collective_timeout_min)
    guard, took_over = lease.take(RunFolder(cfg.run_dir))  # one writer per run folder
    try:
        code = _run_launch(plan, startup, guard, took_over)
    except BaseException as exc:  # torch's CheckpointException is a BaseException
        if not isinstance(exc, SystemExit):
            _record_crash(RunFolder(cfg.run_dir), exc)
        raise
    finally:
        guard.release()
    shutdown()
    return code


def _record_crash(run: RunFolder, exc: BaseException) -> None:
    """Rank 0 writes the verdict of a launch that an exception ended (exit 1; 2 for a refusal
    found mid-launch, e.g. an unreadable checkpoint); other ranks' crashes reach rank 0 as a
    failed collective or reach the launcher as an exit code."""
    from megatron_cpt.errors import UsageError

    if dist.is_initialized() and dist.get_rank() != 0:
        return
    code = UsageError.exit_code if isinstance(exc, UsageError) else 1
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    try:
        run.write_crashed(code, f"{type(exc).__name__}: {first}" if code == 1 else first)
    except OSError as err:  # best effort: the launch's own exception must still surface
        event(f"could not record the crash in {run.exit_status_path}: {err}")


def _already_complete(plan: RunPlan) -> int:
    """A relaunch of a finished run whose optimizer state was dropped: nothing to train; rank 0
    finishes an interrupted end-of-run cleanup and rewrites the verdict (exit 0)."""
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
        run, it = RunFolder(plan.cfg.run_dir), plan.resume.iteration
        checkpointing.drop_optimizer_state_at_end(run.path, it, plan.keep_iterations)
        run.write_exit_status(rf.EXIT_OK, it, plan.budget.iterations)
        event(plan.resume.describe())
    return rf.EXIT_OK


def _run_launch(plan: RunPlan, startup, guard: lease.Guard, took_over: str | None) -> int:
    """Record the run, build the launch, run its steps and write the verdict (collective)."""
    from megatron_cpt.runtime import compute_device

    launch = Launch(plan, record_run(plan, startup), compute_device(), guard)
    if took_over:
        launch.metrics.write({"kind": "event", "iteration": launch.iteration, "event": "lease",
                              "details": took_over})
        event(took_over)
    stop = signals.StopFlag(plan.cfg.train.exit_before_walltime_min).install()
    gc_policy = launch.gc_policy
    gc_policy.start()
    launch.watchdog.start()
    code = 1  # an exception: the tracked run is marked killed, not finished
    try:
        code = run_steps(launch, stop)
        launch.finish(code)
    finally:
        launch.watchdog.stop()
        gc_policy.stop()
        stop.uninstall()
        launch.close(code)
    return code
