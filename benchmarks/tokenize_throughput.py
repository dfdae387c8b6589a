"""Tokenization throughput: `megatron-cpt prep tokenize` vs Megatron-LM's tools/preprocess_data.py.

Not a test. It generates an original synthetic JSONL corpus (templates + pseudo-words, nothing
downloaded), trains a byte-level BPE on part of it (EOD <|endoftext|>), then tokenizes the same
file with the same tokenizer and worker count through

  1. the `tokenizers` library alone (`encode_batch` over batches of 1,000 texts already in memory:
     the ceiling for any tool using that tokenizer on this machine),
  2. `megatron-cpt prep tokenize --workers N`,
  3. Megatron-LM `tools/preprocess_data.py --workers N --append-eod` (a checkout of tag
     core_v0.16.1 given with --megatron-lm; never committed here),

timing each end to end (process start to exit) with its peak memory (resident sets of the whole
process tree). Rounds pair the tools back to back, alternating which one goes first; the speedup
is the per-round ratio Megatron-LM / megatron-cpt, reported as median and range over rounds
(never best of one tool over best of the other). Also: whether the .bin/.idx are byte-identical.

    python benchmarks/tokenize_throughput.py --megatron-lm /tmp/mlm --size-mb 40 --workers 2

Megatron-LM's training package imports Triton kernels at import time; on a CPU-only machine the
script runs preprocess_data.py through a small wrapper that stubs that one module (the
tokenization path never uses it) and needs `six` importable (pass --mlm-pythonpath DIR).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from data_prep.indexed import sha256_file  # noqa: E402

SYLLABLES = ["ka", "lo", "mi", "ren", "tur", "sa", "vel", "qui", "dor", "an", "est", "io", "pra", "zen",
             "bul", "the", "ma", "ri", "ton", "ex", "ul", "cor", "ni", "fa", "gre", "sto", "il", "um"]

_WRAPPER = '''import runpy, sys, types
name = "megatron.core.transformer.custom_layers.batch_invariant_kernels"
stub = types.ModuleType(name)
for fn in ("set_batch_invariant_mode", "is_batch_invariant_mode_enabled",
           "disable_batch_invariant_mode", "enable_batch_invariant_mode"):
    setattr(stub, fn, lambda *a, **k: False)
sys.modules[name] = stub  # imports triton at import time; never used by preprocess_data.py
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
'''


def pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4)))


def make_corpus(path: str, size_mb: float, seed: int = 0) -> int:
    from data_prep.samples.generate import DOMAINS, make_doc

    rng = random.Random(seed)
    target = int(size_mb * 1e6)
    n = size = 0
    with open(path, "w", encoding="utf-8") as fh:
        while size < target:
            parts = []
            while sum(len(p) for p in parts) < rng.randint(1500, 4500):
                r = rng.random()
                if r < 0.6:
                    parts.append(make_doc(rng, rng.choice(list(DOMAINS)), (2, 5)))
                elif r < 0.9:
                    words = [pseudo_word(rng) for _ in range(rng.randint(8, 30))]
                    parts.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ";"]))
                else:
                    parts.append(f"Item {rng.randint(1, 9999)}: {rng.random() * 1000:.2f} units, "
                                 f"ref #{rng.randint(10**5, 10**7)} ({pseudo_word(rng).upper()}).")
            line = json.dumps({"id": f"doc-{n:07d}", "text": "\n\n".join(parts)}, ensure_ascii=False) + "\n"
            fh.write(line)
            size += len(line.encode("utf-8"))
            n += 1
    return n


def train_tokenizer(corpus: str, out_dir: str, vocab_size: int, sample_mb: float = 4.0) -> None:
    """megatron_cpt.tiny's BPE trainer on the first ``sample_mb`` MB of the corpus."""
    from megatron_cpt.tiny import train_tokenizer as train_bpe

    texts, size = [], 0
    with open(corpus, encoding="utf-8") as fh:
        for line in fh:
            t = json.loads(line)["text"]
            texts.append(t)
            size += len(t)
            if size > sample_mb * 1e6:
                break
    train_bpe(out_dir, vocab_size, texts, name="bench-bpe")


_CEILING = r'''
import json, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[2] + "/tokenizer.json")
texts = [json.loads(l)["text"] for l in open(sys.argv[1], encoding="utf-8")]
t0 = time.perf_counter(); c0 = time.process_time(); n = 0
for i in range(0, len(texts), 1000):
    n += sum(len(e.ids) for e in tok.encode_batch(texts[i:i + 1000]))
print(json.dumps({"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0, "tokens": n}))
'''


def timed(cmd, cwd=None, env=None) -> dict:
    """Wall seconds, CPU seconds (the command and its reaped children) and peak memory: the
    sum of the resident sets of the whole process tree, sampled every 50 ms."""
    import resource

    import psutil

    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, root = 0, psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    dt = time.perf_counter() - t0
    out, err = proc.communicate()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}")
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return {"wall_s": round(dt, 2), "cpu_s": round(cpu, 2), "peak_rss_mb": round(peak / 2**20, 1)}


def _ceiling(py, corpus, tok_dir, env) -> dict:
    """The `tokenizers` encode_batch loop alone (texts already in memory)."""
    r = subprocess.run([py, "-c", _CEILING, corpus, tok_dir], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(r.stderr)
    c = json.loads(r.stdout.strip().splitlines()[-1])
    return {"wall_s": round(c["seconds"], 2), "cpu_s": round(c["cpu"], 2), "tokens": c["tokens"]}


def _commands(args, py, corpus, tok_dir, env) -> dict:
    """name -> (command, cwd, env) for this tool and, with --megatron-lm, Megatron-LM."""
    cmds = {"megatron-cpt": ([py, "-m", "megatron_cpt", "prep", "tokenize", "--input", corpus, "--tokenizer",
                              tok_dir, "--output-prefix", os.path.join(args.workdir, "ours"),
                              "--workers", str(args.workers)], REPO, env)}
    if args.megatron_lm:
        wrapper = os.path.join(args.workdir, "run_mlm.py")
        with open(wrapper, "w") as fh:
            fh.write(_WRAPPER)
        mlm_env = dict(env, PYTHONPATH=os.pathsep.join(p for p in [args.mlm_pythonpath] if p))
        cmds["megatron-lm"] = ([py, wrapper, "tools/preprocess_data.py", "--input", corpus, "--output-prefix",
                                os.path.join(args.workdir, "mlm"), "--tokenizer-type", "HuggingFaceTokenizer",
                                "--tokenizer-model", tok_dir, "--append-eod", "--workers", str(args.workers)],
                               args.megatron_lm, mlm_env)
    return cmds


def _summary(values: list[float]) -> dict:
    import statistics

    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "rounds": [round(v, 3) for v in values]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/tokbench")
    ap.add_argument("--size-mb", type=float, default=40.0)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="paired rounds; the order of the tools alternates")
    ap.add_argument("--megatron-lm", help="checkout of NVIDIA/Megatron-LM at tag core_v0.16.1")
    ap.add_argument("--mlm-pythonpath", default="", help="extra PYTHONPATH for Megatron-LM (e.g. `six`)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)

    os.makedirs(args.workdir, exist_ok=True)
    corpus = os.path.join(args.workdir, "corpus.jsonl")
    tok_dir = os.path.join(args.workdir, f"bpe{args.vocab}")
    if not os.path.exists(corpus):
        print(f"generating {args.size_mb} MB corpus ...", file=sys.stderr)
        make_corpus(corpus, args.size_mb)
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        print("training tokenizer ...", file=sys.stderr)
        train_tokenizer(corpus, tok_dir, args.vocab)
    mb = os.path.getsize(corpus) / 1e6
    docs = sum(1 for _ in open(corpus, "rb"))
    py = sys.executable
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cmds = _commands(args, py, corpus, tok_dir, env)
    results: dict = {"corpus_mb": round(mb, 2), "documents": docs, "workers": args.workers,
                     "vocab": args.vocab, "cpus": os.cpu_count(), "runs": []}
    for rnd in range(args.rounds):
        run = {"encode_batch": _ceiling(py, corpus, tok_dir, env)}
        results["tokens_without_eod"] = run["encode_batch"].pop("tokens")
        order = list(cmds) if rnd % 2 == 0 else list(cmds)[::-1]  # alternate who goes first
        for name in order:
            cmd, cwd, cmd_env = cmds[name]
            run[name] = timed(cmd, cwd=cwd, env=cmd_env)
        run["order"] = order
        results["runs"].append(run)
        print(f"round {rnd + 1} ({' then '.join(order)}): "
              + ", ".join(f"{k} {v['wall_s']:.1f}s" for k, v in run.items() if k != "order"), file=sys.stderr)
    results.update(_paired(results["runs"], mb, docs, args.workdir))
    print(json.dumps(results, indent=2))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


def _paired(runs: list[dict], mb: float, docs: int, workdir: str) -> dict:
    """Per-round ratios (same round, back to back) summarized by median and range; peak memory."""
    tools = [k for k in runs[0] if k != "order"]
    out: dict = {"per_tool": {}}
    for name in tools:
        walls = [r[name]["wall_s"] for r in runs]
        out["per_tool"][name] = {"wall_s": _summary(walls), "mb_per_s_median": round(mb / _summary(walls)["median"], 2),
                                 "docs_per_s_median": round(docs / _summary(walls)["median"], 1),
                                 "peak_rss_mb_max": max((r[name]["peak_rss_mb"] for r in runs
                                                         if "peak_rss_mb" in r[name]), default=None)}
    out["ratio_ceiling_over_megatron_cpt"] = _summary([r["encode_batch"]["wall_s"] / r["megatron-cpt"]["wall_s"]
                                                       for r in runs])
    if "megatron-lm" in tools:
        out["speedup_vs_megatron_lm"] = _summary([r["megatron-lm"]["wall_s"] / r["megatron-cpt"]["wall_s"]
                                                  for r in runs])
        out["cpu_ratio_vs_megatron_lm"] = _summary([r["megatron-lm"]["cpu_s"] / r["megatron-cpt"]["cpu_s"]
                                                    for r in runs])
        a, b = os.path.join(workdir, "ours"), os.path.join(workdir, "mlm_text_document")
        out["byte_identical"] = {ext: sha256_file(f"{a}.{ext}") == sha256_file(f"{b}.{ext}") for ext in ("bin", "idx")}
    return out


if __name__ == "__main__":
    sys.exit(main())
