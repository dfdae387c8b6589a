"""``megatron-cpt prep split``: a deterministic document-level train/validation(/test) split.

Each document goes to a split by a hash of its id (``sha256(salt + id)`` read as a number
in [0, 1)), so the split depends on nothing but the ids and the salt: not on the order, the
number of files or tasks.

* **Fractions** (``train=0.98,valid=0.01,test=0.01``): split ``k`` takes the documents whose
  hash falls in its interval. A document lands in the same split in every corpus split with
  the same fractions and salt (a page held out of ``general`` is held out of ``legal`` too),
  and adding documents never moves the others. Sizes are fractions in expectation.
* **Counts** (``valid=100,test=100``, the rest to the split named ``rest``, default
  ``train``): the documents with the smallest hashes fill the counted splits in order, so
  sizes are exact.

Outputs: ``OUT/<split>.jsonl`` (the input records in input order, one JSON object per line,
with the id field filled in where the input had none: ``<file>@<offset>``) and
``OUT/split.json`` (counts, drops by reason, the arguments). Unreadable records are counted
per reason, as everywhere in data_prep, and written nowhere. Memory: 8 bytes per document.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from data_prep.io import DropCounter, RecordReader, expand_inputs, plan_units
from megatron_cpt.errors import UsageError


def parse_sizes(spec: str) -> dict[str, float]:
    """``"train=0.9,valid=0.1"`` -> {"train": 0.9, "valid": 0.1} (numbers as written)."""
    sizes: dict[str, float] = {}
    for part in spec.split(","):
        name, sep, value = part.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            sizes[name.strip()] = float(value)
        except ValueError:
            raise UsageError(f"split size {part!r} is not NAME=NUMBER: use e.g. train=0.98,valid=0.01,test=0.01")
    return sizes


def _check(sizes: dict[str, float], counts: bool) -> None:
    if not sizes or any(v < 0 for v in sizes.values()):
        raise UsageError("split sizes must be non-negative, e.g. train=0.98,valid=0.01,test=0.01")
    if counts and any(v != int(v) for v in sizes.values()):
        raise UsageError(f"--counts {sizes} must be whole numbers of documents")
    if not counts and abs(sum(sizes.values()) - 1.0) > 1e-9:
        raise UsageError(f"--fractions add up to {sum(sizes.values()):g}, not 1: fix them")


def hash_unit(doc_id: str, salt: str) -> float:
    """The document's position in [0, 1): the first 8 bytes of sha256(salt + id)."""
    digest = hashlib.sha256((salt + doc_id).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def _assign(hashes: np.ndarray, sizes: dict[str, float], counts: bool, rest: str) -> np.ndarray:
    """Split index per document (index len(sizes) is ``rest`` in count mode)."""
    names = list(sizes)
    if not counts:
        edges = np.cumsum([sizes[n] for n in names])
        edges[-1] = 1.0  # the last interval ends at 1 whatever the rounding
        return np.searchsorted(edges, hashes, side="right")
    out = np.full(len(hashes), len(names))
    order = np.argsort(hashes, kind="stable")
    start = 0
    for k, n in enumerate(names):
        take = int(sizes[n])
        out[order[start:start + take]] = k
        start += take
    if start > len(hashes):
        raise UsageError(f"--counts ask for {start} documents but the input has {len(hashes)}: lower them")
    return out


def split(inputs, output_dir: str, sizes: dict[str, float], counts: bool = False, rest: str = "train",
          salt: str = "", text_field: str = "text", id_field: str = "id") -> dict:
    """Write one JSONL per split; returns the summary also written to ``split.json``."""
    _check(sizes, counts)
    if counts and rest in sizes:
        raise UsageError(f"--rest {rest!r} is also a counted split: name the remainder differently")
    units = plan_units(expand_inputs(inputs), 1 << 62)
    drops = DropCounter()
    hashes = np.array([hash_unit(rec.id, salt) for u in units  # pass 1: ids only, in memory
                       for rec in RecordReader(text_field, id_field).read(u, drops)])
    names = list(sizes) + ([rest] if counts else [])
    which = _assign(hashes, sizes, counts, rest)
    os.makedirs(output_dir, exist_ok=True)
    files = {n: open(os.path.join(output_dir, f"{n}.jsonl"), "w", encoding="utf-8") for n in names}
    i = 0
    for u in units:  # pass 2: stream the records to their split
        for rec in RecordReader(text_field, id_field, keep_raw=True).read(u, DropCounter()):
            obj = dict(rec.raw)
            obj[id_field] = rec.id
            files[names[which[i]]].write(json.dumps(obj, ensure_ascii=False) + "\n")
            i += 1
    for fh in files.values():
        fh.close()
    summary = {"documents_in": len(hashes) + drops.total, "documents": {n: int((which == k).sum())
                                                                        for k, n in enumerate(names)},
               "dropped": drops.to_dict()["counts"], "dropped_examples": drops.to_dict()["examples"],
               "mode": "counts" if counts else "fractions", "sizes": sizes, "rest": rest if counts else None,
               "salt": salt, "inputs": list(inputs), "id_field": id_field}
    with open(os.path.join(output_dir, "split.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    return summary
