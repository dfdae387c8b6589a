"""Exact and MinHash near-duplicate removal, run before classification.

Two passes over the same work units as the filter (so both executors and the task
invariance carry over):

1. ``SignatureStep`` (one datatrove task per unit): for every readable document a 128-bit
   content hash (exact) and datatrove's MinHash signature (``MinhashDedupSignature``'s own
   shingling and hashing: word 5-grams of the normalized text, ``num_buckets`` x
   ``hashes_per_bucket`` hashes), stored as one 64-bit key per LSH band.
2. ``DedupMerge`` (one process): documents with the same content hash keep their first
   occurrence (input order) and the rest are ``duplicate_exact``; among the survivors, any two
   documents sharing a band key are linked, and each connected cluster keeps its first
   document (the rest are ``near_duplicate``). The decision per unit goes to ``dedup.json``,
   which the filter pass reads to drop and count them.

Thresholds (datatrove's defaults): 14 bands of 8 hashes on word 5-grams. Two documents with
5-gram Jaccard similarity s become candidates with probability 1 - (1 - s^8)^14: 0.92 at
s = 0.8, 0.50 at s = 0.72, 0.05 at s = 0.5 (LSH candidates are not re-checked, as in datatrove).
Documents with fewer than 5 words get no MinHash (exact only).

Why not datatrove's four-stage MinHash pipeline: it reads documents with datatrove's readers
(uncounted drops, no unit split of big files) and writes its own bucket files; the merge here
keeps 8 bytes per band and 16 per document in memory (about 130 B/document: 8 GB for 60M
documents) — above that, shard the corpus or swap in datatrove's bucket stages.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

from data_prep.executor import UnitStep
from data_prep.io import DropCounter, RecordReader
from megatron_cpt.config_ranges import check_instance, ranged
from megatron_cpt.errors import UsageError

MAX_CLUSTER_EXAMPLES = 10


@dataclasses.dataclass
class DedupConfig:
    exact: bool = False
    near: bool = False
    n_grams: int = ranged(5, 1)
    num_buckets: int = ranged(14, 1)
    hashes_per_bucket: int = ranged(8, 1)
    seed: int = ranged(1, 0)

    @classmethod
    def from_raw(cls, raw, source: str) -> "DedupConfig":
        raw = raw or {}
        try:
            cfg = cls(**raw)
        except TypeError as exc:
            raise UsageError(f"{source}: bad `dedup:` entry ({exc}); keys: "
                             f"{[f.name for f in dataclasses.fields(cls)]}") from exc
        check_instance(cfg, source, "dedup.")
        return cfg

    @property
    def enabled(self) -> bool:
        return self.exact or self.near

    def minhash(self):
        from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
        from datatrove.utils.hashing import HashConfig

        from data_prep.quality import WORDS

        # sha1 shingle hashes: datatrove's xxhash path hands str to xxhash, which 4.x refuses
        mc = MinhashConfig(n_grams=self.n_grams, num_buckets=self.num_buckets,
                           hashes_per_bucket=self.hashes_per_bucket, seed=self.seed,
                           hash_config=HashConfig(precision=64, hash_fc="sha1"))
        return MinhashDedupSignature(output_folder=os.devnull, config=mc, language=WORDS)


def band_keys(sig_step, text: str) -> np.ndarray | None:
    """One 64-bit key per LSH band of ``text``'s MinHash signature (None: too few words)."""
    shingles = sig_step.get_shingles(text)
    if not shingles.size:
        return None
    bands = sig_step.get_signature(shingles)
    return np.array([int.from_bytes(hashlib.blake2b(np.asarray(b, np.uint64).tobytes(), digest_size=8).digest(),
                                    "little") for b in bands], dtype=np.uint64)


class SignatureStep(UnitStep):
    name = "dedup signatures"

    def __init__(self, units, work_dir, cfg: DedupConfig, text_field: str, id_field: str):
        super().__init__(units, work_dir)
        self.cfg, self.text_field, self.id_field = cfg, text_field, id_field

    def process(self, unit, rank: int) -> None:
        import time

        started = time.process_time()
        sig = self.cfg.minhash() if self.cfg.near else None
        nb = self.cfg.num_buckets if self.cfg.near else 0
        content, bands, has_sig, ids, lines, nbytes = [], [], [], [], [], 0
        for rec in RecordReader(self.text_field, self.id_field).read(unit, DropCounter()):
            content.append(hashlib.blake2b(rec.text.encode("utf-8"), digest_size=16).digest())
            keys = band_keys(sig, rec.text) if sig is not None else None
            has_sig.append(keys is not None)
            bands.append(keys if keys is not None else np.zeros(nb, np.uint64))
            ids.append(rec.id)
            lines.append(rec.line)
            nbytes += rec.nbytes
        base = self.shard_path(rank)
        np.savez(base + ".dedup.npz", content=np.array(content, dtype="S16"),
                 bands=np.array(bands, dtype=np.uint64).reshape(len(ids), nb),
                 has_sig=np.array(has_sig, dtype=bool), lines=np.array(lines, dtype=np.int64))
        with open(base + ".dedup_ids.json", "w") as fh:
            json.dump({"ids": ids, "bytes": nbytes, "seconds": time.process_time() - started}, fh)


def _components(n: int, edges: np.ndarray) -> np.ndarray:
    """Label of each node = smallest node index of its connected component."""
    labels = np.arange(n)
    if not len(edges):
        return labels
    u, v = edges[:, 0], edges[:, 1]
    while True:
        m = np.minimum(labels[u], labels[v])
        new = labels.copy()
        np.minimum.at(new, u, m)
        np.minimum.at(new, v, m)
        new = new[new]  # pointer jumping
        if np.array_equal(new, labels):
            return labels
        labels = new


def _band_edges(bands: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Edges (first member, other member) within every group of equal band keys."""
    edges = [np.zeros((0, 2), np.int64)]
    if len(members) < 2:
        return edges[0]
    for b in range(bands.shape[1]):
        keys = bands[members, b]
        order = np.argsort(keys, kind="stable")
        sk, sm = keys[order], members[order]
        starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
        first = np.repeat(sm[starts], np.diff(np.r_[starts, len(sk)]))
        pair = first != sm
        edges.append(np.stack([first[pair], sm[pair]], axis=1))
    return np.concatenate(edges)


def decide(content: np.ndarray, bands: np.ndarray, has_sig: np.ndarray, near: bool, exact: bool):
    """(reason per document or '' to keep, index of the kept document of its cluster)."""
    n = len(content)
    reason = np.full(n, "", dtype=object)
    keeper = np.arange(n)
    if exact and n:
        _, first, inverse = np.unique(content, return_index=True, return_inverse=True)
        keeper = first[inverse.reshape(-1)]
        reason[keeper != np.arange(n)] = "duplicate_exact"
    if near and n:
        members = np.flatnonzero((reason == "") & has_sig)
        labels = _components(n, _band_edges(bands, members))
        near_dup = (labels != np.arange(n)) & (reason == "")
        reason[near_dup] = "near_duplicate"
        keeper = np.where(near_dup, labels, keeper)
    return reason, keeper


class DedupMerge:
    """Picklable: cluster every unit's signatures, write ``dedup.json``, then run ``then()``."""

    def __init__(self, cfg: DedupConfig, n_units: int, work_dir: str, then=None):
        self.cfg, self.n_units, self.work_dir, self.then = cfg, n_units, work_dir, then

    def __call__(self):
        self.write()
        return self.then() if self.then is not None else True

    def write(self) -> dict:
        bases = [os.path.join(self.work_dir, "shards", f"{r:05d}") for r in range(self.n_units)]
        loaded = [np.load(b + ".dedup.npz") for b in bases]
        meta = [json.load(open(b + ".dedup_ids.json")) for b in bases]
        ids = [m["ids"] for m in meta]
        sizes = [len(x) for x in ids]
        flat_ids = [i for part in ids for i in part]
        reason, keeper = decide(np.concatenate([z["content"] for z in loaded]),
                                np.concatenate([z["bands"] for z in loaded]),
                                np.concatenate([z["has_sig"] for z in loaded]), self.cfg.near, self.cfg.exact)
        offsets = np.r_[0, np.cumsum(sizes)]
        per_unit = {str(r): {str(int(i - offsets[r])): [reason[i], flat_ids[keeper[i]]]
                             for i in np.flatnonzero(reason[offsets[r]:offsets[r + 1]] != "") + offsets[r]}
                    for r in range(self.n_units)}
        result = {"config": dataclasses.asdict(self.cfg), "documents": int(len(reason)),
                  "removed": {k: int((reason == k).sum()) for k in ("duplicate_exact", "near_duplicate")},
                  "clusters": _clusters(reason, keeper, flat_ids), "per_unit": per_unit,
                  "signature_seconds": sum(m["seconds"] for m in meta), "bytes": sum(m["bytes"] for m in meta)}
        with open(os.path.join(self.work_dir, "dedup.json"), "w") as fh:
            json.dump(result, fh)
        return result


def _clusters(reason: np.ndarray, keeper: np.ndarray, ids: list[str]) -> dict:
    """Count of clusters with removals and the largest few as examples (kept id + removed ids)."""
    removed = np.flatnonzero(reason != "")
    groups: dict[int, list[int]] = {}
    for i in removed:
        groups.setdefault(int(keeper[i]), []).append(int(i))
    biggest = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:MAX_CLUSTER_EXAMPLES]
    return {"count": len(groups),
            "examples": [{"kept": ids[k], "removed": [{"id": ids[i], "reason": reason[i]} for i in members[:20]],
                          "size": 1 + len(members)} for k, members in biggest]}


def load_decisions(work_dir: str) -> dict | None:
    path = os.path.join(work_dir, "dedup.json")
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh)
