"""``megatron-cpt demo``: the whole study at toy scale on CPU (megatron_cpt/demo.py), or
with ``--conversion-check`` the conversion check: tiny Qwen2 models converted to Megatron
checkpoints and verified against transformers at several TP/PP layouts.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from megatron_cpt.config_ranges import arg_range

LAYOUTS = ((1, 1), (2, 1), (1, 2), (2, 2))


def register(sub, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="working folder")
    p.add_argument("--keep", action="store_true", help="reuse what an earlier demo left in --out")
    p.add_argument("--executor", choices=["auto", "slurm", "local"], default="auto",
                   help="auto: the local SLURM cluster when `sinfo` answers, else submitit's "
                   "local executor")
    p.add_argument("--domains", nargs="+", help="subset of the demo grid's corpora "
                   "(general, legal, medical, control_legal, legal_replay25)")
    p.add_argument("--sizes", nargs="+", help="subset of the demo grid's sizes "
                   "(tiny-a, tiny-c, tiny-b)")
    p.add_argument("--bootstrap", **arg_range(int, 1), default=1000, help="report bootstrap replicates")
    p.add_argument("--mlflow", action="store_true",
                   help="track every cell, its exam scores and the report in an MLflow file "
                   "store under OUT/mlruns (one experiment named after the study; no server)")
    p.add_argument("--conversion-check", action="store_true",
                   help="instead: convert tiny models and verify them against transformers "
                   "at TP/PP 1-2")
    p.set_defaults(func=run)


def _measured(cmd: list[str], env: dict) -> tuple[float, float]:
    """Run ``cmd``; return its wall seconds and peak RSS in MB (this child alone)."""
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.stderr.write(child.stderr.read().decode()[-4000:])
        raise SystemExit(f"demo step failed: {' '.join(cmd)}")
    return seconds, usage.ru_maxrss / 1024


def _cli(*args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    bindir = Path(sys.executable).parent
    if nproc > 1:
        cmd = [str(bindir / "torchrun"), "--nproc_per_node", str(nproc), "-m", "megatron_cpt", *args]
    else:
        cmd = [sys.executable, "-m", "megatron_cpt", *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode not in (0, 1):
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"demo step failed: {' '.join(cmd)}")
    return proc


def run(args: argparse.Namespace) -> int:
    if args.conversion_check:
        return conversion_check(args)
    from megatron_cpt.demo import run_study

    if args.out.exists() and not args.keep:
        shutil.rmtree(args.out)
    run_study(args.out, executor=args.executor, corpora=args.domains, bootstrap=args.bootstrap,
              sizes=args.sizes, mlflow=args.mlflow)
    return 0


def conversion_check(args: argparse.Namespace) -> int:
    from megatron_cpt.checkpoint.verify import VerifyResult, format_table
    from megatron_cpt.tiny import make_hf_model, train_tokenizer

    out: Path = args.out
    if out.exists() and not args.keep:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[demo] tiny tokenizer and random Qwen2 models in {out}")
    tok = train_tokenizer(out / "tokenizer", vocab_size=512)
    results, conversions = [], []
    for model in ("tiny-a", "tiny-b"):
        hf, ckpt = out / f"{model}-hf", out / f"{model}-mcore"
        make_hf_model(hf, model, tokenizer_dir=tok)
        seconds, peak_mb = _measured(
            [sys.executable, "-m", "megatron_cpt", "convert", "hf-to-mcore", "--hf", str(hf),
             "--out", str(ckpt), "--force"], {**os.environ, "PYTHONWARNINGS": "ignore"})
        conversions.append((model, seconds, peak_mb))
        print(f"[demo] converted {model}: {seconds:.1f} s, peak RSS {peak_mb:.0f} MB")
        for tp, pp in LAYOUTS:
            js = out / f"verify-{model}-tp{tp}pp{pp}.json"
            _cli("convert", "verify", "--hf", str(hf), "--ckpt", str(ckpt), "--tp", str(tp),
                 "--pp", str(pp), "--json", str(js), nproc=tp * pp)
            r = VerifyResult(**json.loads(js.read_text()))
            results.append((model, r))
            print(f"[demo] verified {model} at TP{tp} PP{pp}: max rel diff {r.max_rel_diff:.2e}")
    print("\nConversion check: transformers (reference) vs Megatron-core at each TP/PP")
    for model in ("tiny-a", "tiny-b"):
        print(f"\n{model}:")
        print(format_table([r for m, r in results if m == model]))
    print("\n| model | conversion wall s | peak RSS MB |\n|---|---|---|")
    for model, seconds, peak_mb in conversions:
        print(f"| {model} | {seconds:.1f} | {peak_mb:.0f} |")
    ok = all(r.ok for _, r in results)
    print("\nall layouts within tolerance" if ok else "\nSOME LAYOUTS EXCEED TOLERANCE")
    return 0 if ok else 1
