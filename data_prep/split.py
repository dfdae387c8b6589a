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
``OUT/split.json`` (counts, drops by reason, the arguments, ``files``). Unreadable records are
counted per reason, as everywhere in data_prep, and written nowhere. Memory: 8 bytes per document.

Nothing is lost on a bad call or a Ctrl-C: ``--output`` and the inputs are checked before
anything is written (an input that is one of the files the split writes or removes is refused),
the files are written under ``OUT/.split.partial/`` and renamed into ``OUT`` only when all are
complete, ``split.json`` last. Re-splitting into the same folder removes the split files the
previous ``split.json`` lists and this split does not write, so the folder holds exactly what
``split.json`` lists; no other file in ``OUT`` is ever touched.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil

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
    names = list(sizes) + ([rest] if counts else [])
    bad = [n for n in names if not n or os.path.basename(n) != n or n.startswith(".")]
    if bad:
        raise UsageError(f"split name(s) {bad} must be plain file names (no '/', no leading '.')")
    files = {n: f"{n}.jsonl" for n in names}
    _check_output(output_dir)
    stale = [f for f in previous_files(output_dir) if f not in files.values()]
    paths = expand_inputs(inputs)
    _check_inputs(paths, output_dir, [*files.values(), SUMMARY, *stale])
    units = plan_units(paths, 1 << 62)
    drops = DropCounter()
    hashes = np.array([hash_unit(rec.id, salt) for u in units  # pass 1: ids only, in memory
                       for rec in RecordReader(text_field, id_field).read(u, drops)])
    which = _assign(hashes, sizes, counts, rest)
    summary = {"documents_in": len(hashes) + drops.total, "documents": {n: int((which == k).sum())
                                                                        for k, n in enumerate(names)},
               "dropped": drops.to_dict()["counts"], "dropped_examples": drops.to_dict()["examples"],
               "mode": "counts" if counts else "fractions", "sizes": sizes, "rest": rest if counts else None,
               "salt": salt, "inputs": list(inputs), "id_field": id_field, "files": files}
    stage = os.path.join(output_dir, STAGE)
    try:
        os.makedirs(stage, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--output {output_dir}: cannot create it ({exc.strerror}); "
                         "choose a folder you can write") from None
    try:
        _write(units, stage, files, names, which, text_field, id_field, summary)
        for name in files.values():
            os.replace(os.path.join(stage, name), os.path.join(output_dir, name))
        for name in stale:  # a previous split's file this split does not write
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(output_dir, name))
        # the summary last: it vouches for the files beside it
        os.replace(os.path.join(stage, SUMMARY), os.path.join(output_dir, SUMMARY))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return summary


SUMMARY = "split.json"
STAGE = ".split.partial"  # written here, renamed into the folder only when complete


def previous_files(output_dir: str) -> list[str]:
    """The split files a previous split wrote into ``output_dir``, from its ``split.json``
    (``files``, or ``<split>.jsonl`` per counted split for older summaries). Only plain
    ``*.jsonl`` names in the folder itself: nothing else there is ever removed."""
    try:
        with open(os.path.join(output_dir, SUMMARY)) as fh:
            old = json.load(fh)
        listed = list((old.get("files") or {}).values()) or [f"{n}.jsonl" for n in old["documents"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    return [f for f in listed if isinstance(f, str) and f.endswith(".jsonl")
            and os.path.basename(f) == f and not f.startswith(".")]


def _check_output(output_dir: str) -> None:
    """--output must be a folder or creatable as one (no file on its path)."""
    path = os.path.abspath(output_dir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        what = "is a file" if path == os.path.abspath(output_dir) else f"is under the file {path}"
        raise UsageError(f"--output {output_dir} {what}, not a folder: choose a folder for the split")


def _check_inputs(paths: list[str], output_dir: str, outputs: list[str]) -> None:
    """An input the split would replace or remove is refused: it would be read while written."""
    targets = {os.path.realpath(os.path.join(output_dir, f)): f for f in outputs}
    for p in paths:
        if "://" in p:
            continue
        if os.path.realpath(p) in targets:
            raise UsageError(f"--input {p} is {targets[os.path.realpath(p)]} in --output {output_dir}, "
                             "a file this split replaces or removes: write the split into another "
                             "--output folder")


def _write(units, stage: str, files: dict[str, str], names: list[str], which: np.ndarray,
           text_field: str, id_field: str, summary: dict) -> None:
    """Pass 2: stream the records to their split files under ``stage``, then the summary."""
    handles = {n: open(os.path.join(stage, f), "w", encoding="utf-8") for n, f in files.items()}
    try:
        i = 0
        for u in units:
            for rec in RecordReader(text_field, id_field, keep_raw=True).read(u, DropCounter()):
                obj = dict(rec.raw)
                obj[id_field] = rec.id
                handles[names[which[i]]].write(json.dumps(obj, ensure_ascii=False) + "\n")
                i += 1
    finally:
        for fh in handles.values():
            fh.close()
    with open(os.path.join(stage, SUMMARY), "w") as fh:
        json.dump(summary, fh, indent=2)
