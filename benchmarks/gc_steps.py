"""Step-time p50 / p99 of `megatron-cpt train` with Python's automatic GC vs. manual GC
(`train.gc_interval`), on the tiny CPU model, alternating the two settings. Not a timed test.

    .venv/bin/python benchmarks/gc_steps.py --steps 80 --rounds 3 --interval 20 [--nproc 2]

Each round runs automatic (`train.gc_interval=null`) then manual (`train.gc_interval=N`) on
the same data and seed, so the machine's noise is spread over both; the first 5 steps of each
run are dropped. Both settings must give bit-identical losses (GC never touches the numbers).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "train" / "tiny-cpu.yaml"
WARMUP = 5


def run(toy: dict, run_dir: Path, steps: int, nproc: int, gc_interval: str) -> list[dict]:
    from megatron_cpt.training.toy import toy_overrides

    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resume of an earlier one
    cmd = ([sys.executable, "-m", "megatron_cpt", "train"] if nproc == 1 else
           [str(Path(sys.executable).parent / "torchrun"), "--standalone",
            f"--nproc_per_node={nproc}", "-m", "megatron_cpt", "train"])
    cmd += ["--config", str(CONFIG), *toy_overrides(toy, run_dir), f"budget.iterations={steps}",
            "data.valid=[]", "checkpoint.every_tokens=null", "logging.tensorboard=false",
            f"train.gc_interval={gc_interval}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["kind"] == "train"]


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--interval", type=int, default=20, help="manual GC: collect every N steps")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--work", type=Path)
    args = p.parse_args()
    from megatron_cpt.training.toy import make_toy

    work = args.work or Path(tempfile.mkdtemp(prefix="gc-bench-"))
    toy = make_toy(work / "toy")
    times = {"auto": [], "manual": []}
    same_losses = True
    for i in range(args.rounds):
        got = {}
        for name, value in (("auto", "null"), ("manual", str(args.interval))):
            recs = run(toy, work / f"{name}-{i}", args.steps, args.nproc, value)
            got[name] = [r["loss"] for r in recs]
            times[name] += [r["step_time_s"] for r in recs][WARMUP:]
        same_losses &= got["auto"] == got["manual"]
    out = {"nproc": args.nproc, "steps_per_run": args.steps, "rounds": args.rounds,
           "interval": args.interval, "identical_losses": same_losses}
    for name, xs in times.items():
        out[name] = {"p50_ms": 1e3 * statistics.median(xs), "p99_ms": 1e3 * pct(xs, 0.99),
                     "mean_ms": 1e3 * statistics.mean(xs), "n": len(xs)}
    out["ratio_manual_over_auto"] = {k: out["manual"][k] / out["auto"][k]
                                     for k in ("p50_ms", "p99_ms", "mean_ms")}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
