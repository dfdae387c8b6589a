"""Train a tiny byte-level BPE on the sample data, saved as a Hugging Face tokenizer folder.

    python -m data_prep.samples.tiny_tokenizer runs/tiny_tokenizer [--vocab 2000]

For offline demos and tests only (the study uses Qwen2.5's own tokenizer folder). The end of
document token is ``<|endoftext|>``, as in Qwen2.5 base models.
"""
from __future__ import annotations

import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def train_tiny_bpe(out_dir: str, vocab_size: int = 2000, files=None) -> str:
    """Fit megatron_cpt.tiny's BPE trainer on the ``text`` fields of the sample JSONL files."""
    from megatron_cpt.tiny import train_tokenizer

    files = files or [os.path.join(HERE, "seed_labeled.jsonl"), os.path.join(HERE, "web_sample.jsonl")]
    texts = []
    for path in files:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    t = json.loads(line).get("text")
                except ValueError:
                    continue
                if isinstance(t, str):
                    texts.append(t)
    return str(train_tokenizer(out_dir, vocab_size, texts, name="tiny-sample-bpe"))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--vocab", type=int, default=2000)
    a = ap.parse_args()
    print(train_tiny_bpe(a.out, a.vocab))
