"""A truncated or corrupt compressed input keeps every complete record that the compression
library can recover; only the damaged tail counts, as one ``read_error``."""
from __future__ import annotations

import gzip
import json
import random
import zlib

import pytest

from data_prep.io import DropCounter, RecordReader, plan_units


def _records(n: int) -> bytes:
    rng = random.Random(0)
    words = "contract statute plaintiff dosage patient ledger audit accrual".split()
    return b"".join(json.dumps({"id": f"d{i}", "text": " ".join(rng.choices(words, k=rng.randint(5, 400)))}
                               ).encode() + b"\n" for i in range(n))


def _recoverable_lines(data: bytes, comp: str) -> int:
    """Complete lines that the library itself recovers from the damaged archive."""
    if comp == "gzip":
        out = zlib.decompressobj(wbits=31).decompress(data)
    else:
        import zstandard

        out = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return out.count(b"\n")


def _read(path):
    (unit,) = plan_units([str(path)])
    drops, reader = DropCounter(), RecordReader()
    kept = list(reader.read(unit, drops))
    return kept, drops.to_dict()["counts"], reader.lines


@pytest.mark.parametrize("comp", ["gzip", "zstd"])
@pytest.mark.parametrize("fraction", [0.13, 0.5, 0.97])
def test_truncated_archive_keeps_every_complete_record(tmp_path, comp, fraction):
    raw = _records(3000)  # several MiB decompressed: more than one read buffer
    if comp == "gzip":
        full, path = gzip.compress(raw), tmp_path / "part.jsonl.gz"
    else:
        import zstandard

        full, path = zstandard.ZstdCompressor().compress(raw), tmp_path / "part.jsonl.zst"
    cut = full[: int(len(full) * fraction)]
    path.write_bytes(cut)
    kept, drops, lines = _read(path)
    expected = _recoverable_lines(cut, comp)
    assert expected > 0
    assert len(kept) == expected
    assert [r.id for r in kept] == [f"d{i}" for i in range(expected)]
    assert drops.get("read_error") == 1  # the damaged tail, once
    assert lines == expected + 1  # documents in = kept + dropped


def test_multi_member_gzip_and_intact_files_read_whole(tmp_path):
    raw = _records(500)
    half = raw.index(b"\n", len(raw) // 2) + 1
    path = tmp_path / "two.jsonl.gz"
    path.write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:]))  # `cat a.gz b.gz`
    kept, drops, lines = _read(path)
    assert len(kept) == 500 and lines == 500 and not drops.get("read_error")


def test_corrupt_gzip_counts_read_error(tmp_path):
    full = bytearray(gzip.compress(_records(2000)))
    full[len(full) // 2: len(full) // 2 + 64] = bytes(64)  # a zeroed block in the middle
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(bytes(full))
    kept, drops, lines = _read(path)
    assert drops.get("read_error") == 1 and 0 < len(kept) < 2000 and lines == len(kept) + 1 + \
        sum(v for k, v in drops.items() if k != "read_error")
