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
EOD = "<|endoftext|>"


def train_tiny_bpe(out_dir: str, vocab_size: int = 2000, files=None) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

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
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOD], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as fh:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOD, "bos_token": None,
                   "model_max_length": 10**9, "name_or_path": "tiny-sample-bpe"}, fh, indent=1)
    return out_dir


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--vocab", type=int, default=2000)
    a = ap.parse_args()
    print(train_tiny_bpe(a.out, a.vocab))
