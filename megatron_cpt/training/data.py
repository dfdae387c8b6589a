"""Training and validation data: Megatron-core ``GPTDataset`` blends over prepared prefixes.

A prefix ``P`` is ``P.bin`` + ``P.idx`` (Megatron IndexedDataset) + ``P.manifest.json``
(written by ``megatron-cpt prep tokenize``; format and checks in ``data_prep/manifest.py``).
The training blend is one ``BlendedDataset`` built by
``BlendedMegatronDatasetBuilder``; every validation prefix is its own dataset (one per domain
plus a general one, never a ratio split of the training data).

Data order is a pure function of the seed and the consumed-sample count: the global batch of
iteration ``i`` is samples ``[i*G, (i+1)*G)`` of the blend; data-parallel rank ``d`` takes the
contiguous slice ``[d*G/D, (d+1)*G/D)`` and feeds it as ``G/(D*m)`` micro batches of ``m``.
Resuming at iteration ``i`` therefore continues with exactly the next sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


def check_prefix(prefix: str | Path, tokenizer_dir: Path, check_hashes: bool = True) -> dict:
    """Refuse a prefix that is missing, whose manifest does not match its files, or that was
    tokenized with another tokenizer (or EOD) than the model's. Returns the manifest.
    The data-prep package owns the manifest format; this is its check."""
    from data_prep.manifest import verify_prefix

    return verify_prefix(str(prefix), check_hashes=check_hashes, tokenizer=str(tokenizer_dir))


@dataclass(frozen=True)
class _Tokenizer:
    """The minimal tokenizer object GPTDatasetConfig needs."""
    eod: int
    vocab_size: int
    unique_identifiers: dict

    @property
    def pad(self) -> int:
        return -1


def _gpt_config(seed: int, seq: int, cache: str | None, eod: int, vocab: int, blend_per_split):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    tok = _Tokenizer(eod=eod, vocab_size=vocab,
                     unique_identifiers={"class": "megatron_cpt", "eod": eod, "vocab": vocab})
    return GPTDatasetConfig(
        random_seed=seed, sequence_length=seq, blend_per_split=blend_per_split,
        path_to_cache=cache, tokenizer=tok, reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
        mmap_bin_files=True,
    )


def _build(config, sizes):
    """Build on global rank 0 first (it writes the index cache), then on the others."""
    import torch.distributed as dist
    from megatron.core.datasets.blended_megatron_dataset_builder import \
        BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    def builder():
        return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()

    rank = dist.get_rank() if dist.is_initialized() else 0
    out = builder() if rank == 0 else None
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:
        out = builder()
    return out


def build_train_dataset(prefixes: list[str], weights: list[float], num_samples: int, seq: int,
                        seed: int, cache_dir: str | None, eod: int, vocab: int):
    """The training blend, long enough for ``num_samples`` samples (collective)."""
    blend = (list(prefixes), [float(w) for w in weights] if len(prefixes) > 1 else None)
    cfg = _gpt_config(seed, seq, cache_dir, eod, vocab, [blend, None, None])
    return _build(cfg, [num_samples, None, None])[0]


def blend_counts(dataset, prefixes: list[str], weights: list[float], num_samples: int) -> dict:
    """What a blend draws from each prefix over the first ``num_samples`` samples, read from
    the BlendedDataset's own index (the samples the trainer consumes, in order); ``fraction``
    is each prefix's share of samples, hence of tokens (every sample is one sequence)."""
    import numpy as np

    index = getattr(dataset, "dataset_index", None)
    if index is None or len(prefixes) < 2:
        counts = [int(num_samples)] + [0] * (len(prefixes) - 1)
    else:
        counts = np.bincount(np.asarray(index[:num_samples]), minlength=len(prefixes)).tolist()
    total = max(1, sum(counts))
    return {"samples": int(num_samples), "sources": [
        {"prefix": p, "weight": float(w), "samples": int(c), "fraction": c / total}
        for p, w, c in zip(prefixes, weights, counts)]}


def build_valid_dataset(prefix: str, num_samples: int, seq: int, seed: int,
                        cache_dir: str | None, eod: int, vocab: int):
    cfg = _gpt_config(seed, seq, cache_dir, eod, vocab, [None, ([prefix], None), None])
    return _build(cfg, [None, num_samples, None])[1]


def micro_batch_indices(iteration: int, global_batch: int, dp_rank: int, dp_size: int,
                        micro_batch: int) -> list[list[int]]:
    """Sample indices of every micro batch this DP rank runs at ``iteration`` (0-based)."""
    per_rank = global_batch // dp_size
    start = iteration * global_batch + dp_rank * per_rank
    return [list(range(start + m * micro_batch, start + (m + 1) * micro_batch))
            for m in range(per_rank // micro_batch)]


def collate(dataset, indices: list[int]) -> dict:
    import torch

    items = [dataset[i] for i in indices]
    return {"tokens": torch.stack([torch.as_tensor(x["tokens"]) for x in items]).long(),
            "labels": torch.stack([torch.as_tensor(x["labels"]) for x in items]).long(),
            "loss_mask": torch.stack([torch.as_tensor(x["loss_mask"]) for x in items]).float(),
            "sample_ids": indices}


def iterate_micro_batches(dataset, iteration: int, global_batch: int, dp_rank: int,
                          dp_size: int, micro_batch: int) -> Iterator[dict]:
    for idx in micro_batch_indices(iteration, global_batch, dp_rank, dp_size, micro_batch):
        yield collate(dataset, idx)


def write_prefix(prefix: str | Path, documents: list[list[int]], tokenizer_dir: Path,
                 eod_id: int, vocab_size: int) -> dict:
    """Write ``prefix.bin/.idx`` + a data-prep manifest from token lists (tests and the toy
    setup; ``megatron-cpt prep tokenize`` writes the same format from text at scale)."""
    import time

    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from data_prep.indexed import sha256_file
    from data_prep.manifest import write_manifest
    from data_prep.text_tokenizer import TextTokenizer, token_dtype

    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tok = TextTokenizer(str(tokenizer_dir))
    if tok.eod_id != eod_id:
        raise ValueError(f"eod_id {eod_id} differs from the tokenizer's {tok.eod_id}")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=token_dtype(vocab_size))
    tokens = 0
    for doc in documents:
        builder.add_document(torch.tensor(doc, dtype=torch.int64), [len(doc)])
        tokens += len(doc)
    builder.finalize(prefix + ".idx")
    info = tok.info()
    man = {"format_version": 1, "kind": "tokens", "documents": len(documents), "tokens": tokens,
           "bytes": 0, "documents_in": len(documents), "dropped": {}, "dropped_examples": {},
           "tokenizer": info,  # vocab_size / dtype: the tokenizer's; the .bin uses vocab_size's
           "bin_sha256": sha256_file(prefix + ".bin"), "idx_sha256": sha256_file(prefix + ".idx"),
           "bin_bytes": Path(prefix + ".bin").stat().st_size,
           "idx_bytes": Path(prefix + ".idx").stat().st_size,
           "inputs": [], "config": {"writer": "megatron_cpt.training.data.write_prefix"},
           "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": 0.0}
    write_manifest(prefix, man)
    return man
