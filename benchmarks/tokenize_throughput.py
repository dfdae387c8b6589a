"""Tokenization throughput: `megatron-cpt prep tokenize` vs Megatron-LM's tools/preprocess_data.py.

Not a test. It generates an original synthetic JSONL corpus (templates + pseudo-words, nothing
downloaded), trains a byte-level BPE on part of it (EOD <|endoftext|>), then tokenizes the same
file with the same tokenizer and worker count through

  1. the `tokenizers` library alone (`encode_batch` over batches of 1,000 texts already in memory:
     the ceiling for any tool using that tokenizer on this machine),
  2. `megatron-cpt prep tokenize --workers N`,
  3. Megatron-LM `tools/preprocess_data.py --workers N --append-eod` (a checkout of tag
     core_v0.16.1 given with --megatron-lm; never committed here),

timing each end to end (process start to exit), and reports documents/s, MB/s of JSONL input,
the ratios, and whether the .bin/.idx files are byte-identical.

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


def timed(cmd, cwd=None, env=None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and all its reaped children)."""
    import resource

    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return dt, (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/tokbench")
    ap.add_argument("--size-mb", type=float, default=40.0)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="alternate the tools this many times; best of")
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
    results: dict = {"corpus_mb": round(mb, 2), "documents": docs, "workers": args.workers,
                     "vocab": args.vocab, "cpus": os.cpu_count(), "runs": {}}
    best: dict[str, float] = {}
    best_cpu: dict[str, float] = {}

    def record(name, timing):
        seconds, cpu = timing
        best[name] = min(seconds, best.get(name, float("inf")))
        best_cpu[name] = min(cpu, best_cpu.get(name, float("inf")))
        results["runs"].setdefault(name, []).append({"wall_s": round(seconds, 2), "cpu_s": round(cpu, 2)})

    for rnd in range(args.rounds):
        # 1. tokenizers encode_batch ceiling (time of the encode loop only)
        r = subprocess.run([py, "-c", _CEILING, corpus, tok_dir], capture_output=True, text=True, env=env)
        if r.returncode:
            raise SystemExit(r.stderr)
        ceil = json.loads(r.stdout.strip().splitlines()[-1])
        record("encode_batch", (ceil["seconds"], ceil["cpu"]))
        results["tokens_without_eod"] = ceil["tokens"]
        # 2. this tool
        ours = os.path.join(args.workdir, "ours")
        record("megatron-cpt", timed([py, "-m", "megatron_cpt", "prep", "tokenize", "--input", corpus,
                                      "--tokenizer", tok_dir, "--output-prefix", ours,
                                      "--workers", str(args.workers)], cwd=REPO, env=env))
        # 3. Megatron-LM
        if args.megatron_lm:
            wrapper = os.path.join(args.workdir, "run_mlm.py")
            with open(wrapper, "w") as fh:
                fh.write(_WRAPPER)
            mlm_env = dict(env, PYTHONPATH=os.pathsep.join(p for p in [args.mlm_pythonpath] if p))
            mlm_prefix = os.path.join(args.workdir, "mlm")
            record("megatron-lm", timed([py, wrapper, "tools/preprocess_data.py", "--input", corpus,
                                         "--output-prefix", mlm_prefix, "--tokenizer-type",
                                         "HuggingFaceTokenizer", "--tokenizer-model", tok_dir,
                                         "--append-eod", "--workers", str(args.workers)],
                                        cwd=args.megatron_lm, env=mlm_env))
        print(f"round {rnd + 1}: " + ", ".join(f"{k} {v[-1]['wall_s']:.1f}s" for k, v in results["runs"].items()),
              file=sys.stderr)

    rows = {}
    for name, sec in best.items():
        cpu = best_cpu[name]
        rows[name] = {"wall_s": round(sec, 2), "docs_per_s": round(docs / sec, 1), "mb_per_s": round(mb / sec, 2),
                      "cpu_s": round(cpu, 2), "mb_per_cpu_s": round(mb / cpu, 3)}
    results["best"] = rows
    if "megatron-lm" in best:
        results["speedup_vs_megatron_lm"] = round(best["megatron-lm"] / best["megatron-cpt"], 3)
        results["cpu_efficiency_vs_megatron_lm"] = round(best_cpu["megatron-lm"] / best_cpu["megatron-cpt"], 3)
        a, b = os.path.join(args.workdir, "ours"), os.path.join(args.workdir, "mlm_text_document")
        results["byte_identical"] = {ext: sha256_file(f"{a}.{ext}") == sha256_file(f"{b}.{ext}") for ext in ("bin", "idx")}
    results["fraction_of_encode_batch"] = round(best["encode_batch"] / best["megatron-cpt"], 3)
    results["fraction_of_encode_batch_cpu"] = round(best_cpu["encode_batch"] / best_cpu["megatron-cpt"], 3)
    print(json.dumps(results, indent=2))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
