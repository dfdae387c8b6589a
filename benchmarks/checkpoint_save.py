"""Checkpoint size per kind and the training-loop stall per save, sync vs async (issue 14).

    .venv/bin/python benchmarks/checkpoint_save.py --model tiny-a --dtype float32
    .venv/bin/python benchmarks/checkpoint_save.py --model qwen2.5-0.5b --dtype float32 --stall

One process (NCCL on a GPU, gloo on CPU), on the device the trainer picks (``compute_device``),
so the layer spec is the trainer's too (Transformer Engine where it imports on CUDA, the local
spec on CPU). The trainer's own ``build_training_state`` builds GPTModel + DDP + distributed
optimizer; ``--steps`` real training steps give the optimizer its state. Then the
trainer's ``Checkpointer`` writes a resume checkpoint synchronously (timed: that is the loop's
stall with ``checkpoint.async_save: false``); ``drop_optimizer_state`` turns it into an evaluation
checkpoint; sizes are the bytes on disk of each kind over the model's parameter count.

``--stall``: a second save with ``async_save: true``. The loop's stall is the time spent in
``save()`` (state dicts, write plan, host copy, fork) plus every ``poll()`` until the commit;
between polls the loop "computes" for ``--compute-s`` (sleeping, so the benchmark does not
double its memory by copy-on-write pages). ``wait_s`` (a blocking wait at the end, only if the
write outlasted ``--max-polls``) is reported apart and counted in the stall.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-a", help="a name under configs/models/")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--steps", type=int, default=1, help="training steps before the saves")
    ap.add_argument("--seq-length", type=int, default=32)
    ap.add_argument("--stall", action="store_true", help="also time an async save")
    ap.add_argument("--compute-s", type=float, default=1.0, help="loop time between polls")
    ap.add_argument("--max-polls", type=int, default=600)
    ap.add_argument("--fully-parallel", action="store_true")
    ap.add_argument("--no-distributed-optimizer", action="store_true",
                    help="Megatron's non-distributed mixed-precision optimizer")
    ap.add_argument("--weights-only", action="store_true",
                    help="only the evaluation kind (weights/ as the Checkpointer writes it): bf16 "
                         "on CPU, where Megatron's optimizers cannot save the local spec's fp32 norms")
    ap.add_argument("--work", type=Path, default=None, help="folder for the checkpoints")
    ap.add_argument("--json", type=Path, default=None)
    return ap.parse_args(argv)


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _state(args):
    """Model, optimizer and scheduler after ``args.steps`` real steps on random tokens."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_cpt.models.qwen2 import ModelConfig
    from megatron_cpt.runtime import compute_device
    from megatron_cpt.training.config import TrainConfig
    from megatron_cpt.training.loop import _forward_step, build_training_state

    model_cfg = ModelConfig.load(args.model)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    cfg = TrainConfig.from_dict({
        "run_dir": "/nonexistent", "model": {"pretrained": "-"},
        "precision": {"dtype": args.dtype}, "optimizer": {"lr": 1e-5, "min_lr": 1e-6},
        "parallel": {"distributed_optimizer": not args.no_distributed_optimizer},
        "budget": {"iterations": args.steps + 10}})
    gpt, model, optimizer, scheduler = build_training_state(
        cfg, model_cfg, dtype, args.steps + 10, compute_device())
    g = torch.Generator().manual_seed(0)
    seq = args.seq_length
    batch = {"tokens": torch.randint(0, model_cfg.vocab_size, (1, seq), generator=g),
             "labels": torch.randint(0, model_cfg.vocab_size, (1, seq), generator=g),
             "loss_mask": torch.ones(1, seq)}
    fb, step_fn = get_forward_backward_func(), _forward_step(seq)
    for _ in range(args.steps):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        fb(forward_step_func=step_fn, data_iterator=iter([batch]), model=[model],
           num_microbatches=1, seq_length=seq, micro_batch_size=1, forward_only=False)
        optimizer.step()
        scheduler.step(increment=1)
    return model_cfg, gpt, optimizer, scheduler


def _pretrained(work: Path, model_cfg) -> Path:
    """What a commit copies from ``model.pretrained``: model.yaml and a tokenizer folder."""
    pre = work / "pretrained"
    (pre / "tokenizer").mkdir(parents=True, exist_ok=True)
    model_cfg.save(pre / "model.yaml")
    return pre


def _saver(work: Path, name: str, pretrained: Path, async_save: bool, fully_parallel: bool):
    from megatron_cpt.training import checkpointing

    return checkpointing.Checkpointer(checkpointing.SaveOptions(
        run_dir=work / name, pretrained=pretrained, keep_last=1, keep_iterations=set(),
        async_save=async_save, fully_parallel=fully_parallel))


def _sizes(ckpt: Path, params: int) -> dict:
    from megatron_cpt.training import checkpointing

    resume = {"resume_bytes": _bytes(ckpt), "weights_bytes": _bytes(ckpt / "weights"),
              "optimizer_bytes": _bytes(ckpt / "optimizer"), "trainer_bytes": _bytes(ckpt / "trainer")}
    checkpointing.drop_optimizer_state(ckpt)
    out = {**resume, "evaluation_bytes": _bytes(ckpt)}
    out["resume_bytes_per_param"] = out["resume_bytes"] / params
    out["evaluation_bytes_per_param"] = out["evaluation_bytes"] / params
    return out


def _async_stall(args, work: Path, pretrained: Path, state) -> dict:
    """Stall of one async save: save() + polls (+ a final wait if the write outlasted them)."""
    gpt, optimizer, scheduler = state
    saver = _saver(work, "async", pretrained, True, args.fully_parallel)
    t0 = time.perf_counter()
    saver.save(2, gpt, optimizer, scheduler, {})
    save_call = time.perf_counter() - t0
    polls, poll_s = 0, 0.0
    while saver.pending is not None and polls < args.max_polls:
        time.sleep(args.compute_s)
        t = time.perf_counter()
        saver.poll()
        poll_s += time.perf_counter() - t
        polls += 1
    t = time.perf_counter()
    saver.wait()
    wait_s = time.perf_counter() - t
    return {"async_save_call_s": save_call, "async_poll_s": poll_s, "async_polls": polls,
            "async_wait_s": wait_s, "async_stall_s": save_call + poll_s + wait_s,
            "async_background_s": time.perf_counter() - t0}


def _measure(args, work: Path) -> dict:
    from megatron_cpt.runtime import mcore_patches

    t = time.perf_counter()
    model_cfg, gpt, optimizer, scheduler = _state(args)
    build_s = time.perf_counter() - t
    params = sum(p.numel() for p in gpt.parameters())
    pretrained = _pretrained(work, model_cfg)
    saver = _saver(work, "sync", pretrained, False, args.fully_parallel)
    mcore_patches.signal_proof_writer_queue()  # once per launch: not part of a save's time
    result = {"model": args.model, "dtype": args.dtype, "params": params,
              "distributed_optimizer": not args.no_distributed_optimizer,
              "fully_parallel": args.fully_parallel, "build_and_steps_s": build_s}
    if args.weights_only:
        return {**result, **_weights_only(saver, gpt, work, params)}
    t = time.perf_counter()
    ckpt = saver.save(1, gpt, optimizer, scheduler, {})
    result.update(sync_save_s=time.perf_counter() - t, **_sizes(ckpt, params))
    shutil.rmtree(ckpt)
    if args.stall:
        result.update(_async_stall(args, work, pretrained, (gpt, optimizer, scheduler)))
        result["stall_ratio_async_over_sync"] = result["async_stall_s"] / result["sync_save_s"]
    return result


def _weights_only(saver, gpt, work: Path, params: int) -> dict:
    """The evaluation kind alone: ``weights/`` written by the Checkpointer's own writer."""
    folder = work / "weights_only" / "weights"
    t = time.perf_counter()
    saver._write(gpt.sharded_state_dict(), folder, 0)
    return {"weights_save_s": time.perf_counter() - t, "weights_bytes": _bytes(folder),
            "evaluation_bytes_per_param": _bytes(folder) / params}


def main(argv=None) -> dict:
    args = parse_args(argv)
    from megatron_cpt.runtime import init_distributed, shutdown

    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517"), ("RANK", "0"),
                       ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    init_distributed(1, 1, seed=0)
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.work))
    try:
        result = _measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    shutdown()
    return result


if __name__ == "__main__":
    main()
