"""Save-time cost of ``checkpoint.optimizer_format``: ``dp_reshardable`` (each DP rank writes its
own optimizer shard) vs ``fully_reshardable`` (the shards are gathered over DP into per-parameter
tensors first, so the checkpoint resumes at any TP/PP). Same model, same run, formats alternated
round by round (a noisy machine slows both alike); the trainer's own state dicts
(``checkpointing._state_dicts``) and Megatron-core's ``dist_checkpointing.save``.

    # CPU, 2 ranks (DP2): tiny-a, and the Qwen2.5-0.5B width cut to 2 layers
    torchrun --nproc_per_node 2 benchmarks/optimizer_format.py --model tiny-a --rounds 5
    torchrun --nproc_per_node 2 benchmarks/optimizer_format.py --model qwen2.5-0.5b --layers 2
    # GPUs: e.g. 8 ranks at TP2 (DP4)
    torchrun --nproc_per_node 8 benchmarks/optimizer_format.py --model qwen2.5-7b --tp 2

Reports per format the median save seconds (slowest rank), the checkpoint bytes and bytes per
parameter, and the ratio fully / dp.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

FORMATS = ("dp_reshardable", "fully_reshardable")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-a", help="configs/models name")
    p.add_argument("--layers", type=int, default=None, help="cut the model to this many layers")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3, help="saves per format (alternated)")
    p.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    p.add_argument("--json", type=Path, help="write the result here")
    return p.parse_args(argv)


def _build(args):
    """Model, DDP and distributed optimizer as the trainer builds them, after one Adam step."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_cpt.models.qwen2 import ModelConfig
    from megatron_cpt.runtime import compute_device
    from megatron_cpt.training.config import TrainConfig
    from megatron_cpt.training.loop import _forward_step, build_training_state

    model_cfg = ModelConfig.load(args.model)
    if args.layers:
        model_cfg = dataclasses.replace(model_cfg, num_layers=args.layers)
    device = compute_device()
    dtype_name = "bfloat16" if device.type == "cuda" else "float32"
    cfg = TrainConfig.from_dict({"run_dir": "/nonexistent", "model": {"pretrained": "-"},
                                 "parallel": {"tp": args.tp, "pp": args.pp},
                                 "precision": {"dtype": dtype_name}, "budget": {"iterations": 1}})
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    gpt, model, optimizer, _ = build_training_state(cfg, model_cfg, dtype, 1, device)
    seq = 32
    batch = {"tokens": torch.randint(0, model_cfg.vocab_size, (1, seq)),
             "labels": torch.randint(0, model_cfg.vocab_size, (1, seq)),
             "loss_mask": torch.ones(1, seq)}
    get_forward_backward_func()(forward_step_func=_forward_step(seq), data_iterator=iter([batch]),
                                model=[model], num_microbatches=1, seq_length=seq,
                                micro_batch_size=1, forward_only=False)
    optimizer.step()  # creates the Adam moments the checkpoint holds
    return gpt, optimizer, model_cfg


def _save_seconds(gpt, optimizer, fmt: str, out: Path) -> tuple[float, int]:
    """One save (collective): the slowest rank's seconds and the bytes written."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_cpt.runtime import all_reduce_values
    from megatron_cpt.training.checkpointing import _state_dicts

    if dist.get_rank() == 0:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
    dist.barrier()
    t0 = time.perf_counter()
    dist_checkpointing.save(_state_dicts(gpt, optimizer, False, fmt), str(out))
    dist.barrier()
    seconds = all_reduce_values([time.perf_counter() - t0], op=dist.ReduceOp.MAX)[0]
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return seconds, size


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch.distributed as dist

    from megatron_cpt.runtime import init_distributed, mcore_patches, shutdown

    init_distributed(args.tp, args.pp, seed=0)
    mcore_patches.signal_proof_writer_queue()  # as the trainer's save does
    gpt, optimizer, model_cfg = _build(args)
    n_params = sum(p.numel() for p in gpt.parameters())
    n = torch_all_reduce_sum(n_params) // max(1, dist.get_world_size() // (args.tp * args.pp))
    root = args.dir or Path(tempfile.gettempdir()) / "megatron_cpt_optfmt"
    times = {f: [] for f in FORMATS}
    sizes = {}
    for _ in range(args.rounds):
        for fmt in FORMATS:
            seconds, sizes[fmt] = _save_seconds(gpt, optimizer, fmt, root / fmt)
            times[fmt].append(seconds)
    med = {f: statistics.median(times[f]) for f in FORMATS}
    result = {"model": args.model, "layers": model_cfg.num_layers, "parameters": n,
              "tp": args.tp, "pp": args.pp, "world": dist.get_world_size(), "rounds": args.rounds,
              "save_s": med, "all_save_s": times, "bytes": sizes,
              "bytes_per_param": {f: sizes[f] / n for f in FORMATS},
              "fully_over_dp": med["fully_reshardable"] / med["dp_reshardable"]}
    if dist.get_rank() == 0:
        shutil.rmtree(root, ignore_errors=True)
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    shutdown()
    return result


def torch_all_reduce_sum(value: int) -> int:
    """Parameters of the whole model: each TP/PP rank holds a part, DP replicas repeat it."""
    import torch

    from megatron_cpt.runtime import all_reduce_values

    return int(all_reduce_values([value], dtype=torch.int64)[0])


if __name__ == "__main__":
    main()
