"""Writing Megatron-core ``IndexedDataset`` files (``.bin`` + ``.idx``, format version 1).

The layout is byte-for-byte what ``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder``
writes for one sequence per document (``tools/preprocess_data.py`` without sentence splitting):

    .idx: b"MMIDIDX\\x00\\x00" | <Q version=1 | <B dtype code | <Q sequence count
          | <Q document count (= sequences + 1) | int32 lengths | int64 byte pointers
          | int64 document indices (0, 1, ..., n)
    .bin: the tokens of every document (EOD included), concatenated.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import struct

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
# Megatron's DType codes (megatron/core/datasets/indexed_dataset.py)
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5,
               np.float64: 6, np.float32: 7, np.uint16: 8}


class ShardWriter:
    """Appends tokenized documents to ``<path>.bin`` and keeps the per-document lengths."""

    def __init__(self, path: str, dtype):
        self.path = path
        self.dtype = np.dtype(dtype)
        self.fh = open(path + ".bin", "wb")
        self.lengths: list[int] = []

    def add_batch(self, docs: list[list[int]], eod_id: int) -> None:
        """Writes each document followed by EOD (documents must be non-empty)."""
        flat: list[int] = []
        ext = flat.extend
        app = flat.append
        lens = self.lengths
        for ids in docs:
            ext(ids)
            app(eod_id)
            lens.append(len(ids) + 1)
        self.fh.write(np.array(flat, dtype=self.dtype).tobytes())

    def close(self) -> None:
        self.fh.close()
        np.save(self.path + ".lengths.npy", np.asarray(self.lengths, dtype=np.int32))


def write_index(idx_path: str, lengths: np.ndarray, dtype) -> None:
    dtype = np.dtype(dtype)
    lengths = np.asarray(lengths, dtype=np.int32)
    n = len(lengths)
    pointers = np.zeros(n, dtype=np.int64)
    if n > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    with open(idx_path, "wb") as fh:
        fh.write(INDEX_HEADER)
        fh.write(struct.pack("<Q", 1))
        fh.write(struct.pack("<B", DTYPE_CODES[dtype.type]))
        fh.write(struct.pack("<Q", n))
        fh.write(struct.pack("<Q", n + 1))
        fh.write(lengths.tobytes(order="C"))
        fh.write(pointers.tobytes(order="C"))
        fh.write(np.arange(n + 1, dtype=np.int64).tobytes(order="C"))


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def merge_shards(shards: list[str], prefix: str, dtype, progress: bool = True) -> dict:
    """Concatenate shard ``.bin`` files in order into ``prefix.bin`` and write ``prefix.idx``.

    Returns sizes and sha256 of both files (the .bin hash is computed while copying).
    """
    from tqdm import tqdm

    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    lengths = [np.load(s + ".lengths.npy") for s in shards]
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int32)
    total = sum(os.path.getsize(s + ".bin") for s in shards)
    h = hashlib.sha256()
    tmp_bin = prefix + ".bin.tmp"
    with open(tmp_bin, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc="merge .bin",
                                          disable=not progress, leave=False) as bar:
        for s in shards:
            with open(s + ".bin", "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    out.write(block)
                    h.update(block)
                    bar.update(len(block))
    write_index(prefix + ".idx.tmp", all_lengths, dtype)
    os.replace(tmp_bin, prefix + ".bin")
    os.replace(prefix + ".idx.tmp", prefix + ".idx")
    return {
        "documents": int(len(all_lengths)),
        "tokens": int(all_lengths.sum(dtype=np.int64)),
        "bin_bytes": os.path.getsize(prefix + ".bin"),
        "idx_bytes": os.path.getsize(prefix + ".idx"),
        "bin_sha256": h.hexdigest(),
        "idx_sha256": sha256_file(prefix + ".idx"),
    }


def write_documents(prefix: str, documents: list[list[int]], dtype) -> dict:
    """``prefix.bin/.idx`` from token lists taken as they are (EOD already in them); returns
    what :func:`merge_shards` returns. For small prefixes (tests, toy data)."""
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    lengths = np.asarray([len(d) for d in documents], dtype=np.int32)
    flat = np.fromiter((t for d in documents for t in d), dtype=np.dtype(dtype), count=int(lengths.sum()))
    with open(prefix + ".bin", "wb") as fh:
        fh.write(flat.tobytes())
    write_index(prefix + ".idx", lengths, dtype)
    return {"documents": len(documents), "tokens": int(lengths.sum(dtype=np.int64)),
            "bin_bytes": os.path.getsize(prefix + ".bin"), "idx_bytes": os.path.getsize(prefix + ".idx"),
            "bin_sha256": sha256_file(prefix + ".bin"), "idx_sha256": sha256_file(prefix + ".idx")}


def remove_shards(shards: list[str]) -> None:
    for s in shards:
        for suffix in (".bin", ".lengths.npy"):
            if os.path.exists(s + suffix):
                os.remove(s + suffix)


def copy_file(src: str, dst: str) -> None:
    shutil.copyfile(src, dst)
