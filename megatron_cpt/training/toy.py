"""A complete toy setup on disk for tests, benchmarks and the demo: tiny BPE tokenizer,
random tiny Qwen2 converted to a checkpoint, and tokenized train/valid prefixes."""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

_WORDS = {
    "legal": "tenant landlord lease contract court appeal statute plaintiff defendant deposit "
             "trust offer acceptance consideration enforceable judge ruling liability".split(),
    "general": "river mountain library market train noon city weather garden school music "
               "kitchen window morning bridge harbor forest".split(),
}


def _documents(domain: str, n_docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = _WORDS[domain]
    docs = []
    for _ in range(n_docs):
        sents = []
        for _ in range(rng.randint(2, 6)):
            k = rng.randint(4, 10)
            start = rng.randrange(len(words))
            # mostly sequential words: a learnable pattern
            sents.append("The " + " ".join(words[(start + j) % len(words)] for j in range(k)) + ".")
        docs.append(" ".join(sents))
    return docs


def make_toy(root: Path, model: str = "tiny-a", python: str | None = None) -> dict:
    """Create (or reuse) ``root/{tokenizer,hf,pretrained,data}``; returns the paths."""
    from transformers import PreTrainedTokenizerFast

    from megatron_cpt.models.qwen2 import ModelConfig
    from megatron_cpt.tiny import EOD, make_hf_model, train_tokenizer
    from data_prep.manifest import write_prefix

    root = Path(root)
    tok_dir, hf_dir, ckpt = root / "tokenizer", root / "hf", root / "pretrained"
    if not (tok_dir / "tokenizer.json").is_file():
        train_tokenizer(tok_dir)
    if not (hf_dir / "config.json").is_file():
        make_hf_model(hf_dir, model, seed=0, tokenizer_dir=tok_dir)
    if not (ckpt / "metadata.json").is_file():
        subprocess.run([python or sys.executable, "-m", "megatron_cpt", "convert", "hf-to-mcore",
                        "--hf", str(hf_dir), "--out", str(ckpt), "--force"], check=True,
                       stdout=subprocess.DEVNULL)
    tok = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    eod = tok.convert_tokens_to_ids(EOD)
    vocab = ModelConfig.load(model).vocab_size
    prefixes = {}
    for name, domain, n, seed in (("legal_train", "legal", 300, 1), ("general_train", "general", 300, 2),
                                  ("legal_valid", "legal", 30, 3), ("general_valid", "general", 30, 4)):
        prefix = root / "data" / name
        if not Path(f"{prefix}.manifest.json").is_file():
            docs = [tok.encode(d) + [eod] for d in _documents(domain, n, seed)]
            write_prefix(prefix, docs, tok_dir, eod_id=eod, vocab_size=vocab)
        prefixes[name] = str(prefix)
    return {"tokenizer": tok_dir, "hf": hf_dir, "pretrained": ckpt, "prefixes": prefixes,
            "eod": eod}


def toy_overrides(toy: dict, run_dir: Path) -> list[str]:
    p = toy["prefixes"]
    return [f"run_dir={run_dir}", f"model.pretrained={toy['pretrained']}",
            f"data.train=[{{prefix: {p['legal_train']}, weight: 0.7}}, "
            f"{{prefix: {p['general_train']}, weight: 0.3}}]",
            f"data.valid=[{{name: legal, prefix: {p['legal_valid']}}}, "
            f"{{name: general, prefix: {p['general_valid']}}}]"]


if __name__ == "__main__":
    print(make_toy(Path(sys.argv[1])))
