"""The training loop, on Megatron-core primitives (DDP, distributed optimizer,
OptimizerParamScheduler, pipeline schedules). One function, read top to bottom:

    plan = validate.prepare(cfg)        # every check, no tensors
    init distributed; build model; load pretrained (first launch)
    wrap in DDP; optimizer; scheduler; resume from RUN/checkpoints/latest (later launches)
    for each iteration: forward_backward -> agree on loss / stop -> optimizer.step -> log,
                        validate, checkpoint
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_cpt.training import checkpointing, data, signals, startup_record
from megatron_cpt.training.config import TrainConfig
from megatron_cpt.training.gc_policy import GCPolicy
from megatron_cpt.training.metrics import Metrics, event
from megatron_cpt.training.validate import RUN_JSON, Plan, prepare

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


def _write_run_files(plan: Plan, startup: dict | None = None) -> None:
    import yaml

    run = Path(plan.cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(plan.cfg.to_dict(), sort_keys=False))
    info = {"config_hash": plan.config_hash, "world_size": plan.world_size, "dp": plan.dp,
            "budget": plan.budget.to_dict(), "startup": startup}
    tmp = run / f"{RUN_JSON}.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, run / RUN_JSON)


def _fusion_extra(cfg: TrainConfig, dtype: torch.dtype) -> dict:
    """TransformerConfig fields for the fused kernels this machine offers (``model.*_fusion``)."""
    from megatron_cpt.models import fusions

    resolved = fusions.resolve(cfg.model, "bfloat16" if dtype == torch.bfloat16 else "float32")
    return fusions.transformer_config_fields(resolved)


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
                        extra={**_fp8_extra(cfg, model_cfg.num_layers), **_memory_extra(cfg),
                               **_fusion_extra(cfg, dtype)})
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


def _build(plan: Plan, device):
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


def train(cfg: TrainConfig, force: bool = False) -> int:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_cpt.runtime import cuda_connections, init_distributed, shutdown

    connections = cuda_connections.apply(cfg.parallel.tp, cfg.parallel.sequence_parallel)  # before CUDA
    plan = prepare(cfg, force=force)  # raises UsageError before any tensor exists
    startup = startup_record.build(cfg, plan.dtype, connections=connections)
    init_distributed(cfg.parallel.tp, cfg.parallel.pp, seed=cfg.train.seed)
    rank = dist.get_rank()
    run = Path(cfg.run_dir)
    if rank == 0:
        _write_run_files(plan, startup)
        event(startup_record.format_record(startup))
        removed = checkpointing.clean_stale(run)
        if removed:
            event(f"removed uncommitted checkpoint folders {removed}")
    dist.barrier()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    gpt, model, optimizer, scheduler, resume = _build(plan, device)
    start, prev_meta = 0, None
    metrics = Metrics(run, enabled=rank == 0, tensorboard=cfg.logging.tensorboard)
    if resume is not None:
        prev_meta = checkpointing.load(resume, gpt, optimizer, scheduler)
        start = prev_meta["iteration"]
        metrics.write({"kind": "event", "iteration": start, "event": "resume",
                       "details": resume.name})
        if rank == 0:
            event(f"resumed {resume} at iteration {start}")

    b, bud, seq = cfg.batch, plan.budget, cfg.data.seq_length
    n_iter = bud.iterations
    cache = cfg.data.cache_dir or str(run / "data_cache")
    train_ds = data.build_train_dataset([p.prefix for p in cfg.data.train],
                                        [p.weight for p in cfg.data.train],
                                        n_iter * b.global_batch_size, seq, cfg.train.seed, cache,
                                        plan.eod_id, plan.vocab_size)
    n_valid = cfg.eval.iters * b.micro_batch_size * plan.dp
    valid_ds = [data.build_valid_dataset(p.prefix, n_valid, seq, cfg.train.seed, cache,
                                         plan.eod_id, plan.vocab_size) for p in cfg.data.valid]
    dp_rank, dp = ps.get_data_parallel_rank(), plan.dp
    fb = get_forward_backward_func()
    forward_step = _forward_step(seq)
    stop = signals.StopFlag(cfg.train.exit_before_walltime_min).install()
    last_stage_tp0 = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    log_ids = cfg.logging.log_sample_ids and ps.is_pipeline_first_stage() and \
        ps.get_tensor_model_parallel_rank() == 0
    if log_ids:
        (run / "debug").mkdir(exist_ok=True)
        ids_file = open(run / "debug" / f"samples_dp{dp_rank}.jsonl", "a")
    world = dist.get_world_size()
    flops_per_iter = bud.flops_per_token * bud.tokens_per_iteration
    stop_after = cfg.train.stop_after_iterations

    def meta_for(it: int) -> dict:
        return {"consumed_samples": it * b.global_batch_size,
                "tokens": it * bud.tokens_per_iteration, "flops": it * flops_per_iter,
                "config_hash": plan.config_hash, "dtype": plan.dtype,
                "source": {"type": "pretrained", "path": cfg.model.pretrained}}

    def save(it: int) -> None:
        gcp.at_sync_point()
        path = checkpointing.save(run, it, gpt, optimizer, scheduler, meta_for(it),
                                  Path(cfg.model.pretrained), cfg.checkpoint.keep_last,
                                  plan.keep_iterations)
        metrics.write({"kind": "event", "iteration": it, "event": "checkpoint", "details": path.name})

    def validate(it: int) -> None:
        gcp.at_sync_point()
        for name, ds in zip(plan.valid_names, valid_ds):
            it_data = data.iterate_micro_batches(ds, 0, n_valid, dp_rank, dp, b.micro_batch_size)
            with torch.no_grad():
                losses = fb(forward_step_func=forward_step, data_iterator=it_data, model=[model],
                            num_microbatches=cfg.eval.iters, seq_length=seq,
                            micro_batch_size=b.micro_batch_size, forward_only=True)
            v = torch.tensor([_mean_loss(losses) if last_stage_tp0 else 0.0,
                              1.0 if last_stage_tp0 else 0.0], device=device)
            dist.all_reduce(v)
            metrics.write({"kind": "valid", "iteration": it, "tokens": it * bud.tokens_per_iteration,
                           "flops": it * flops_per_iter, "prefix": name,
                           "loss": float(v[0] / v[1])})

    code = signals.EXIT_OK
    it = start
    saved_at = start if resume is not None else -1
    launched = 0
    gcp = GCPolicy(cfg.train.gc_interval)
    gcp.start()
    try:
        while it < n_iter:
            t0 = time.perf_counter()
            model.zero_grad_buffer()
            optimizer.zero_grad()
            micro = data.micro_batch_indices(it, b.global_batch_size, dp_rank, dp, b.micro_batch_size)
            batches = [data.collate(train_ds, idx) for idx in micro]
            if log_ids:
                rec = {"iteration": it + 1, "ids": [i for m in micro for i in m]}
                if it == 0:
                    rec["tokens"] = [bt["tokens"].tolist() for bt in batches]
                    rec["labels"] = [bt["labels"].tolist() for bt in batches]
                ids_file.write(json.dumps(rec) + "\n")
                ids_file.flush()
            losses = fb(forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
                        num_microbatches=plan.accumulation, seq_length=seq,
                        micro_batch_size=b.micro_batch_size, forward_only=False)
            # one all-reduce carries the loss, the stop flag and the walltime flag
            agree = torch.tensor([_mean_loss(losses) if last_stage_tp0 else 0.0,
                                  1.0 if last_stage_tp0 else 0.0, stop.local_code()],
                                 device=device, dtype=torch.float64)
            dist.all_reduce(agree)
            loss = float(agree[0] / agree[1])
            want_stop = bool(agree[2] > 0)
            if os.environ.get(checkpointing.FAULT_ENV) == f"nan_loss@{it + 1}":  # tests only
                loss = float("nan")
            if not math.isfinite(loss):
                msg = (f"non-finite loss {loss} at iteration {it + 1}; stopped with a checkpoint of "
                       f"the last good iteration {it}; lower optimizer.lr or check the data")
                if saved_at != it:
                    save(it)
                metrics.write({"kind": "event", "iteration": it, "event": "nonfinite", "details": msg})
                if rank == 0:
                    event(msg)
                code = signals.EXIT_NONFINITE
                break
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
            ok, grad_norm, _ = optimizer.step()
            scheduler.step(increment=1)
            it += 1
            launched += 1
            gcp.step(it)  # inside the timed step: its pause is part of the step time
            dt = time.perf_counter() - t0
            if it % cfg.logging.interval == 0 or it == n_iter:
                tflops = flops_per_iter / dt / world / 1e12
                rec = {"kind": "train", "iteration": it, "tokens": it * bud.tokens_per_iteration,
                       "flops": it * flops_per_iter, "loss": loss,
                       "lr": lr,
                       "grad_norm": None if grad_norm is None else float(grad_norm),
                       "step_time_s": dt, "tokens_per_s": bud.tokens_per_iteration / dt,
                       "tflops_per_gpu": tflops, "mfu": tflops / cfg.logging.mfu_peak_tflops}
                metrics.write(rec)
                metrics.progress(rec, n_iter)
            if valid_ds and cfg.eval.interval_tokens and it % plan.eval_every_iters == 0:
                validate(it)
            if it in bud.checkpoint_iterations:
                save(it)
                saved_at = it
            if it < n_iter and (want_stop or (stop_after and launched >= stop_after)):
                if saved_at != it:
                    save(it)
                    saved_at = it
                why = f"signal {stop.received}" if stop.received else \
                    ("stop request from another rank or walltime" if want_stop else "stop_after_iterations")
                metrics.write({"kind": "event", "iteration": it, "event": "stop", "details": why})
                if rank == 0:
                    event(f"stopping at iteration {it} ({why}); exit {signals.EXIT_REQUEUE} = requeue")
                code = signals.EXIT_REQUEUE
                break
        if code == signals.EXIT_OK:
            if valid_ds and cfg.eval.at_end and not (cfg.eval.interval_tokens
                                                     and it % plan.eval_every_iters == 0):
                validate(it)
            if cfg.checkpoint.save_at_end and saved_at != it:
                save(it)
            metrics.write({"kind": "event", "iteration": it, "event": "done", "details": ""})
        if rank == 0:  # the launcher reads this even where torchrun masks the exit code
            status = {"code": code, "iteration": it, "iterations": n_iter,
                      "reason": {0: "done", 3: "nonfinite", 42: "requeue"}[code]}
            (run / "exit_status.json").write_text(json.dumps(status) + "\n")
        dist.barrier()  # leave together: torchrun kills the others when one rank exits first
    finally:
        gcp.stop()
        stop.uninstall()
        metrics.close()
        if log_ids:
            ids_file.close()
    shutdown()
    return code
