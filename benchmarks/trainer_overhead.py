"""Per-step time of `megatron-cpt train` vs. a bare Megatron-core loop (same tiny model, same
batch shape, same process count, same optimizer and schedule call). Not a timed test.

    .venv/bin/python benchmarks/trainer_overhead.py --steps 40 --repeats 3 [--nproc 1]

The bare loop is what the trainer wraps: build GPTModel, load the same checkpoint, Megatron
DDP + distributed optimizer, `get_forward_backward_func` over pre-built micro batches,
optimizer.step, scheduler.step. The trainer adds: dataset reads (GPTDataset), one all-reduce
per step (loss + stop flag), metrics.jsonl, the progress line. Medians of the steady-state steps
(the first 5 are dropped) are compared; runs alternate trainer / bare to spread machine noise.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "train" / "tiny-cpu.yaml"
WARMUP = 5


def bare(args) -> None:
    """The bare loop, one rank (run under torchrun for nproc > 1)."""
    import torch
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_cpt.training import loop
    from megatron_cpt.training.config import TrainConfig
    from megatron_cpt.training.preflight import prepare
    from megatron_cpt.runtime import compute_device, init_distributed
    from megatron_cpt.training.toy import toy_overrides

    toy = json.loads(Path(args.toy_json).read_text())
    cfg = TrainConfig.load(CONFIG, toy_overrides(toy, Path(args.run_dir)) +
                           [f"budget.iterations={args.steps}", "data.valid=[]"])
    plan = prepare(cfg, force=True)
    init_distributed(cfg.parallel.tp, cfg.parallel.pp, seed=cfg.train.seed)
    gpt, model, optimizer, scheduler, _ = loop._build(plan, compute_device())  # as the trainer
    g = torch.Generator().manual_seed(0)
    mb, seq = cfg.batch.micro_batch_size, cfg.data.seq_length
    batches = [{"tokens": torch.randint(0, 512, (mb, seq), generator=g),
                "labels": torch.randint(0, 512, (mb, seq), generator=g),
                "loss_mask": torch.ones(mb, seq)} for _ in range(plan.accumulation)]
    fb, step_fn = get_forward_backward_func(), loop._forward_step(seq)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        model.zero_grad_buffer()
        optimizer.zero_grad()
        fb(forward_step_func=step_fn, data_iterator=iter(batches), model=[model],
           num_microbatches=plan.accumulation, seq_length=seq, micro_batch_size=mb,
           forward_only=False)
        optimizer.step()
        scheduler.step(increment=1)
        times.append(time.perf_counter() - t0)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(times))


def run_trainer(toy: dict, work: Path, steps: int, nproc: int, i: int) -> list[float]:
    from megatron_cpt.training.toy import toy_overrides

    run = work / f"trainer-{i}"
    cmd = ([sys.executable, "-m", "megatron_cpt", "train"] if nproc == 1 else
           [str(Path(sys.executable).parent / "torchrun"), "--standalone",
            f"--nproc_per_node={nproc}", "-m", "megatron_cpt", "train"])
    cmd += ["--config", str(CONFIG), *toy_overrides(toy, run), f"budget.iterations={steps}",
            "data.valid=[]", "checkpoint.every_tokens=null", "logging.tensorboard=false"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] for r in recs if r["kind"] == "train"]


def run_bare(toy_json: Path, work: Path, steps: int, nproc: int, i: int) -> list[float]:
    out = work / f"bare-{i}.json"
    cmd = ([sys.executable] if nproc == 1 else
           [str(Path(sys.executable).parent / "torchrun"), "--standalone",
            f"--nproc_per_node={nproc}"])
    cmd += [__file__, "--bare", "--toy-json", str(toy_json), "--run-dir", str(work / f"bare-run-{i}"),
            "--steps", str(steps), "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--work", type=Path)
    p.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--toy-json", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.bare:
        return bare(args)
    from megatron_cpt.training.toy import make_toy

    work = args.work or Path(tempfile.mkdtemp(prefix="trainer-bench-"))
    toy = make_toy(work / "toy")
    toy_json = work / "toy.json"
    toy_json.write_text(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in toy.items()}))
    tr, br = [], []
    for i in range(args.repeats):
        tr += run_trainer(toy, work, args.steps, args.nproc, i)[WARMUP:]
        br += run_bare(toy_json, work, args.steps, args.nproc, i)[WARMUP:]
    t, b = statistics.median(tr), statistics.median(br)
    result = {"nproc": args.nproc, "steps_per_run": args.steps, "repeats": args.repeats,
              "trainer_median_step_s": t, "bare_median_step_s": b, "ratio": t / b,
              "trainer_mean_step_s": statistics.mean(tr), "bare_mean_step_s": statistics.mean(br)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
