"""Training throughput of one model size and parallel layout: tokens/s/GPU, model TFLOP/s/GPU,
MFU and peak memory. Random init and synthetic tokens (no data loading cost); the model,
DDP, optimizer and options are built by the trainer's own ``build_training_state``.

    # one GPU, Qwen2.5-1.5B shape, sequence 4096, BF16, SDPA attention
    python benchmarks/throughput.py --model qwen2.5-1.5b --seq-length 4096 \
        --micro-batch-size 2 --global-batch-size 16 --attention-backend sdpa --json out.json
    # 8 GPUs, 14B at TP4 (DP2)
    torchrun --nproc_per_node 8 benchmarks/throughput.py --model qwen2.5-14b --tp 4 ...
    # CPU (tests): the tiny shapes
    python benchmarks/throughput.py --model tiny-a --seq-length 128 --steps 3 --warmup 1

FLOPs per token are counted as the budget module counts them (megatron_cpt.training.budget:
6N plus the attention term, logits once). Step times are taken with CUDA events on GPU
(device-side) and wall clock on CPU; the median of the timed steps is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
from pathlib import Path

# dense BF16 peak per GPU (TFLOP/s), matched against torch.cuda.get_device_name()
PEAKS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}


def detect_peak(explicit: float | None) -> tuple[float | None, str]:
    import torch

    if explicit:
        return explicit, "command line"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAKS.items():
            if key in name:
                return value, f"detected {name}"
        return None, f"unknown GPU {name}: pass --peak-tflops"
    return None, "CPU (no MFU)"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-a", help="configs/models name (qwen2.5-1.5b, ...)")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=None,
                   help="default: micro batch x DP (one micro batch per rank)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--attention-backend", choices=["te", "sdpa", "local"], default=None)
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    p.add_argument("--fp8", choices=["hybrid", "e4m3"], default=None)
    p.add_argument("--recompute", choices=["selective", "full"], default=None)
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--overlap", action="store_true", help="overlap grad reduce and param gather")
    p.add_argument("--no-fusions", action="store_true",
                   help="turn off gradient-accumulation, RoPE and cross-entropy fusion (else auto)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--peak-tflops", type=float, default=None, help="per-GPU peak for MFU")
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("--label", default="", help="free text in the markdown row")
    return p.parse_args(argv)


NO_FUSIONS = {"gradient_accumulation_fusion": False, "rope_fusion": False,
              "cross_entropy_fusion": "off", "bias_activation_fusion": False,
              "bias_dropout_fusion": False, "masked_softmax_fusion": False}


FUSION_FIELDS = ("gradient_accumulation_fusion", "apply_rope_fusion", "cross_entropy_loss_fusion",
                 "bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion",
                 "persist_layer_norm")


def _median_step_seconds(step, warmup: int, steps: int, device) -> float:
    """The slowest rank's median step time after ``warmup`` steps, on the clock
    ``work_timer`` picks for ``device`` (CUDA events on GPU: device time, not launch time)."""
    from megatron_cpt.runtime.timing import work_timer

    timer, times = work_timer(device), []
    for i in range(warmup + steps):
        timer.start()
        step()
        timer.stop()
        seconds = timer.seconds()
        if i >= warmup:
            times.append(seconds)
    return _slowest_rank(statistics.median(times))


def _slowest_rank(seconds: float) -> float:
    """The largest ``seconds`` over all ranks (collective): the slowest rank sets the pace."""
    import torch.distributed as dist

    from megatron_cpt.runtime import all_reduce_values

    return all_reduce_values([seconds], op=dist.ReduceOp.MAX)[0]


def _train_config(args, dtype_name: str):
    """The trainer's config for this measurement (no data, no run folder)."""
    from megatron_cpt.training.config import TrainConfig

    return TrainConfig.from_dict({
        "run_dir": "/nonexistent", "model": {"pretrained": "-", "attention_backend": args.attention_backend,
                                                **(NO_FUSIONS if args.no_fusions else {})},
        "parallel": {"tp": args.tp, "pp": args.pp, "sequence_parallel": args.sequence_parallel,
                     "overlap_grad_reduce": args.overlap, "overlap_param_gather": args.overlap},
        "precision": {"dtype": dtype_name, "fp8": args.fp8},
        "memory": {"recompute": args.recompute},
        "optimizer": {"lr": 1e-5, "min_lr": 1e-6},
        "budget": {"iterations": args.steps + args.warmup}})


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    import torch
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_cpt.models.qwen2 import ModelConfig
    from megatron_cpt.runtime import compute_device, init_distributed, shutdown
    from megatron_cpt.training.budget import flops_per_token
    from megatron_cpt.training.loop import _forward_step, build_training_state

    model_cfg = ModelConfig.load(args.model)
    model_cfg.check_parallel(args.tp, args.pp)
    from megatron_cpt.runtime import cuda_connections

    cuda_connections.apply(args.tp, args.sequence_parallel)  # as the trainer: before CUDA starts
    init_distributed(args.tp, args.pp, seed=0)
    world = dist.get_world_size()
    dp = world // (args.tp * args.pp)
    gbs = args.global_batch_size or args.micro_batch_size * dp
    accumulation = gbs // (args.micro_batch_size * dp)
    on_gpu = torch.cuda.is_available()
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    cfg = _train_config(args, dtype_name)
    device = compute_device()
    gpt, model, optimizer, scheduler = build_training_state(
        cfg, model_cfg, dtype, args.steps + args.warmup, device)
    seq, mb = args.seq_length, args.micro_batch_size
    g = torch.Generator().manual_seed(0)
    batches = [{"tokens": torch.randint(0, model_cfg.vocab_size, (mb, seq), generator=g),
                "labels": torch.randint(0, model_cfg.vocab_size, (mb, seq), generator=g),
                "loss_mask": torch.ones(mb, seq)} for _ in range(accumulation)]
    step_fn, fb = _forward_step(seq), get_forward_backward_func()

    def step():
        model.zero_grad_buffer()
        optimizer.zero_grad()
        fb(forward_step_func=step_fn, data_iterator=iter(batches), model=[model],
           num_microbatches=accumulation, seq_length=seq, micro_batch_size=mb, forward_only=False)
        optimizer.step()
        scheduler.step(increment=1)

    step_s = _median_step_seconds(step, args.warmup, args.steps, device)
    tokens_per_step = gbs * seq
    tok_s_gpu = tokens_per_step / step_s / world
    tflops = flops_per_token(model_cfg, seq) * tok_s_gpu / 1e12
    peak, peak_source = detect_peak(args.peak_tflops)
    mem = (torch.cuda.max_memory_allocated() / 2**30 if on_gpu
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    result = {
        "model": args.model, "seq_length": seq, "micro_batch_size": mb, "global_batch_size": gbs,
        "tp": args.tp, "pp": args.pp, "dp": dp, "gpus": world, "dtype": dtype_name, "fp8": args.fp8,
        "attention_backend": gpt.decoder.layers[0].self_attention.core_attention.__class__.__name__,
        "recompute": args.recompute, "sequence_parallel": args.sequence_parallel,
        "overlap": args.overlap, "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "step_time_s": step_s, "tokens_per_s_per_gpu": tok_s_gpu, "tflops_per_gpu": tflops,
        "peak_tflops": peak, "peak_source": peak_source,
        "mfu": tflops / peak if peak else None,
        ("peak_memory_gib" if on_gpu else "peak_rss_gib"): mem,
        "steps": args.steps, "warmup": args.warmup, "label": args.label,
        "fusions": {k: getattr(gpt.config, k) for k in FUSION_FIELDS},
        "cuda_device_max_connections": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS"),
    }
    result["markdown_row"] = (
        f"| {args.model} | {seq} | {args.tp}/{args.pp}/{dp} | {mb}x{accumulation} | {dtype_name}"
        f"{'+fp8 ' + args.fp8 if args.fp8 else ''} | {result['attention_backend']} | "
        f"{args.recompute or '-'} | {tok_s_gpu:,.0f} | {tflops:.1f} | "
        f"{'%.1f%%' % (100 * result['mfu']) if result['mfu'] else '-'} | {mem:.1f} | {result['device']} |")
    if dist.get_rank() == 0:
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    shutdown()
    return result


if __name__ == "__main__":
    main()
