"""Per-step cost of experiment tracking: `megatron-cpt train` on the tiny CPU model with no
tracker, with W&B (offline) and with MLflow (local file store). Not a timed test.

    .venv/bin/python benchmarks/tracking_overhead.py --steps 40 --repeats 3

The tracker is called after each step's ``metrics.jsonl`` line, outside ``step_time_s``; so
the per-step time here is the wall time between consecutive train records (their ``time``
field, 1 ms resolution), which includes the previous step's tracker call. Medians of the
steady-state steps (the first 5 dropped) are compared; runs alternate backends to spread
machine noise. Startup (``wandb.init`` / the MLflow run) is reported apart, as the time to
the first train record. On a loaded 2-core machine the ratio moves by tens of percent, so
``call_ms`` also times the tracker call itself, in process: one trainer-shaped train record
(17 values) per call, what each step adds whatever the model.
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


def backend_overrides(name: str, work: Path) -> list[str]:
    if name == "wandb":
        return ["logging.wandb.project=bench", "logging.wandb.mode=offline"]
    if name == "mlflow":
        return [f"logging.mlflow.tracking_uri=file://{work}/mlruns", "logging.mlflow.experiment=bench"]
    return []


def run_once(toy: dict, work: Path, backend: str, steps: int, i: int) -> tuple[list[float], float]:
    """Per-step wall times (s) of one launch, and its time from start to the first train record."""
    from megatron_cpt.training.toy import toy_overrides

    run = work / f"{backend}-{i}"
    cmd = [sys.executable, "-m", "megatron_cpt", "train", "--config", str(CONFIG),
           *toy_overrides(toy, run), f"budget.iterations={steps}", "data.valid=[]",
           "checkpoint.every_tokens=null", "checkpoint.save_at_end=false",
           "logging.tensorboard=false", *backend_overrides(backend, work)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_DIR": str(work / "wandb"),
           "WANDB_SILENT": "true"}
    t0 = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in recs if r.get("event") == "tracking_disabled"], recs
    times = [r["time"] for r in recs if r["kind"] == "train"]
    return [b - a for a, b in zip(times, times[1:])], times[0] - t0


def call_ms(backend: str, work: Path, n: int = 200) -> float:
    """Median milliseconds of one ``Tracking.log`` of a train record (in this process)."""
    from megatron_cpt.run_folder import RunFolder
    from megatron_cpt.training.config import TrainConfig
    from megatron_cpt.training.tracking import Tracking

    cfg = TrainConfig.from_dict({"logging": {}})
    for item in backend_overrides(backend, work):
        key, value = item.split("=", 1)
        setattr(getattr(cfg.logging, key.split(".")[1]), key.split(".")[2], value)
    run = RunFolder(work / f"calls-{backend}")
    run.path.mkdir(parents=True, exist_ok=True)
    tr = Tracking(cfg.logging, run, floor=-1, start=0, note=print, warn=print)
    rec = {"kind": "train", "tokens": 512, "flops": 1e9, "loss": 2.0, "lr": 1e-3, "grad_norm": 1.0,
           "step_time_s": 0.1, "tokens_per_s": 5e3, "tflops_per_gpu": 0.01, "mfu": 1e-5,
           "rank_time_max_s": 0.1, "slowest_rank": 0, "rank_time_min_s": 0.1, "fastest_rank": 0,
           "peak_mem_gb": 0.0, "peak_mem_rank": 0}
    times = []
    for it in range(1, n + 1):
        t0 = time.perf_counter()
        tr.log({**rec, "iteration": it})
        times.append(time.perf_counter() - t0)
    tr.close()
    return statistics.median(times) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", type=Path)
    args = p.parse_args()
    from megatron_cpt.training.toy import make_toy

    work = args.work or Path(tempfile.mkdtemp(prefix="tracking-bench-"))
    (work / "wandb").mkdir(parents=True, exist_ok=True)
    toy = make_toy(work / "toy")
    backends = ("none", "wandb", "mlflow")
    steps: dict[str, list[float]] = {b: [] for b in backends}
    first: dict[str, list[float]] = {b: [] for b in backends}
    for i in range(args.repeats):
        for b in backends:
            dts, start = run_once(toy, work, b, args.steps, i)
            steps[b] += dts[WARMUP:]
            first[b].append(start)
    base = statistics.median(steps["none"])
    result = {"steps_per_run": args.steps, "repeats": args.repeats,
              "call_ms": {b: call_ms(b, work) for b in ("wandb", "mlflow")}}
    for b in backends:
        med = statistics.median(steps[b])
        result[b] = {"median_step_s": med, "ratio": med / base, "mean_step_s": statistics.mean(steps[b]),
                     "median_time_to_first_step_s": statistics.median(first[b])}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
