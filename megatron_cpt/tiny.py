"""Tiny Qwen2 models and BPE tokenizers made locally (no hub), for tests, the demo, the
data_prep samples and the tokenization benchmark: the project's one BPE trainer."""
from __future__ import annotations

from pathlib import Path

import torch

from data_prep.text_tokenizer import DEFAULT_EOD as EOD
from megatron_cpt.models.qwen2 import ModelConfig

# Original sentences written for this project, only used to fit a toy BPE vocabulary.
_TOKENIZER_TEXT = """\
The tenant signed a lease for two years and the landlord kept the deposit in trust.
A contract needs an offer, an acceptance and consideration to be enforceable in court.
The patient reported chest pain after exercise, and the nurse recorded blood pressure.
Insulin lowers blood glucose; the physician adjusted the dose after the laboratory test.
The auditor traced each journal entry to the ledger and checked the bank reconciliation.
Depreciation spreads the cost of equipment over its useful life on the balance sheet.
Rivers carry sediment to the sea, and mountains rise where tectonic plates collide.
The library opens at nine, the market closes at six, and the train leaves at noon.
"""


def train_tokenizer(out_dir: Path | str, vocab_size: int = 512, texts: list[str] | None = None,
                    name: str | None = None) -> Path:
    """A byte-level BPE (EOD ``<|endoftext|>``, no BOS) saved as a Hugging Face tokenizer
    folder. ``texts``: the corpus to fit (default: a few built-in sentences); ``name``: the
    ``name_or_path`` recorded in tokenizer_config.json (manifests name the tokenizer by it)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts or _TOKENIZER_TEXT.splitlines() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOD, pad_token=EOD)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    if name:
        conf_path = out_dir / "tokenizer_config.json"
        conf_path.write_text(json.dumps({**json.loads(conf_path.read_text()), "name_or_path": name}, indent=2))
    return out_dir


def make_hf_model(out_dir: Path, model: ModelConfig | str, seed: int = 0,
                  dtype: torch.dtype = torch.float32, tokenizer_dir: Path | None = None,
                  vocab_size: int | None = None) -> Path:
    """Save a random ``Qwen2ForCausalLM`` with ``model``'s shape. Norm weights and QKV
    biases are randomized too, so a conversion that mixes them up cannot pass."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = ModelConfig.load(model) if isinstance(model, str) else model
    hf_cfg = cfg.to_hf_config("float32")
    if vocab_size is not None:
        hf_cfg["vocab_size"] = vocab_size
    hf_cfg.pop("architectures")
    hf_cfg.pop("model_type")
    hf_cfg.pop("torch_dtype")
    torch.manual_seed(seed)
    hf = Qwen2ForCausalLM(Qwen2Config(**hf_cfg))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    hf = hf.to(dtype)
    out_dir = Path(out_dir)
    hf.save_pretrained(str(out_dir), safe_serialization=True)
    if tokenizer_dir is not None:
        from megatron_cpt.checkpoint.hf_files import copy_tokenizer

        copy_tokenizer(Path(tokenizer_dir), out_dir)
    return out_dir
