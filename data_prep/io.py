"""Input discovery, work units and a record reader that accounts for every bad input.

Inputs are JSONL (plain, ``.gz``, ``.zst``/``.zstd``) or Parquet files, local paths or any
fsspec URL. Work is split into *units*: a whole file, or a byte range of a large plain
local JSONL file (so one big file still keeps every worker busy). Units are always
processed and merged in input order, so outputs do not depend on the number of tasks.

Every record read is either yielded as a document or counted under a drop reason
(``DROP_REASONS``) with the file and line of the first few occurrences.
"""
from __future__ import annotations

import dataclasses
import glob as _glob
import json
import os
from typing import Iterator

from megatron_cpt.errors import UsageError

DROP_REASONS = (
    "blank_line",  # an empty line in a JSONL file (no record at all)
    "malformed_json",  # the line is not valid JSON, or not a JSON object
    "invalid_utf8",  # the line's bytes are not valid UTF-8
    "missing_text_field",  # the record has no text field (or it is null)
    "text_not_string",  # the text field is a number, list, object...
    "empty_text",  # the text is empty or only whitespace
    "read_error",  # the rest of a file could not be read (truncated archive...)
    "no_tokens",  # (tokenize) the text produced no tokens
    "contaminated",  # (filter) shares an n-gram with an exam item
)
MAX_EXAMPLES = 5
DEFAULT_UNIT_BYTES = 16 * 2**20

_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".jsonl.zst",
                   ".jsonl.zstd", ".json.zst", ".ndjson.gz", ".ndjson.zst")
_PARQUET_SUFFIXES = (".parquet", ".pq")


def file_format(path: str) -> str:
    low = path.lower()
    if low.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    if low.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    raise UsageError(f"input {path!r} has an unknown format: use .jsonl, .jsonl.gz, .jsonl.zst or .parquet files")


def _compression(path: str) -> str | None:
    low = path.lower()
    if low.endswith(".gz"):
        return "gzip"
    if low.endswith((".zst", ".zstd")):
        return "zstd"
    return None


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def expand_inputs(patterns: list[str] | str) -> list[str]:
    """Expand globs (local or fsspec) into a sorted, de-duplicated file list.

    Raises UsageError when a pattern matches nothing: a missing input fails at once.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise UsageError("no input given: pass --input GLOB (or `inputs:` in the config)")
    files: list[str] = []
    for pattern in patterns:
        if _is_remote(pattern):
            import fsspec

            fs, _, paths = fsspec.get_fs_token_paths(pattern)
            proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
            matched = sorted(f"{proto}://{p}" if "://" not in p else p for p in paths if fs.isfile(p))
        else:
            pattern = pattern[len("file://"):] if pattern.startswith("file://") else pattern
            matched = sorted(p for p in _glob.glob(os.path.expanduser(pattern), recursive=True)
                             if os.path.isfile(p))
        if not matched:
            raise UsageError(f"input {pattern!r} matches no file: check the path or glob")
        for path in matched:
            file_format(path)
            if path not in files:
                files.append(path)
    return files


@dataclasses.dataclass(frozen=True)
class Unit:
    """A piece of work: one file, or the lines starting in [start, end) of a plain JSONL file."""

    path: str
    start: int = 0
    end: int = -1  # -1: to the end of the file
    part: int = 0  # index of this unit within its file

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def plan_units(files: list[str], unit_bytes: int = DEFAULT_UNIT_BYTES) -> list[Unit]:
    """Split inputs into ordered units (byte ranges only for plain local JSONL)."""
    units: list[Unit] = []
    for path in files:
        if file_format(path) == "jsonl" and _compression(path) is None and not _is_remote(path):
            size = os.path.getsize(path)
            if size > unit_bytes:
                n = -(-size // unit_bytes)
                bounds = [size * i // n for i in range(n + 1)]
                units.extend(Unit(path, bounds[i], bounds[i + 1], i) for i in range(n))
                continue
        units.append(Unit(path))
    return units


class DropCounter:
    """Counts dropped records per reason and keeps the location of the first few."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[dict]] = {}

    def add(self, reason: str, path: str, line: int, detail: str | None = None, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n
        ex = self.examples.setdefault(reason, [])
        if len(ex) < MAX_EXAMPLES:
            item = {"file": path, "line": line}
            if detail:
                item["detail"] = detail[:200]
            ex.append(item)

    def to_dict(self) -> dict:
        return {"counts": dict(sorted(self.counts.items())), "examples": self.examples}

    def merge(self, other: dict, line_offset: dict[str, int] | None = None) -> None:
        """Merge a ``to_dict()`` from a unit; ``line_offset`` maps a file to lines before the unit."""
        for reason, n in other["counts"].items():
            self.counts[reason] = self.counts.get(reason, 0) + n
        for reason, items in other["examples"].items():
            ex = self.examples.setdefault(reason, [])
            for item in items:
                if len(ex) < MAX_EXAMPLES:
                    item = dict(item)
                    if line_offset and item.get("line", 0) > 0:
                        item["line"] += line_offset.get(item["file"], 0)
                    ex.append(item)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclasses.dataclass
class Record:
    text: str
    id: str
    line: int  # 1-based line (JSONL, within the unit) or row (Parquet)
    nbytes: int  # UTF-8 bytes of the text
    raw: dict | None = None  # the full JSON object (only when keep_raw)


def _open_binary(path: str):
    if _is_remote(path):
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path, "rb")


CHUNK_BYTES = 1 << 16  # compressed bytes per decompress call: a corrupt block loses at most one


def _decompressed_chunks(fh, comp: str) -> Iterator[bytes]:
    """Decompress incrementally, yielding every byte that can be recovered before raising on a
    truncated or corrupt archive. (A buffered reader over gzip/zstd raises on the buffer fill and
    loses up to a whole buffer of readable records; decompressing chunk by chunk loses none.)
    Concatenated gzip members and zstd frames are read one after another."""
    import zlib

    def new_decoder():
        if comp == "gzip":
            return zlib.decompressobj(wbits=31)
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj()

    dec, started = new_decoder(), False
    while True:
        data = fh.read(CHUNK_BYTES)
        if not data:
            break
        while data:
            if dec.eof:  # the next gzip member / zstd frame
                dec = new_decoder()
            try:
                out = dec.decompress(data)
            except Exception as exc:  # zlib.error / zstandard.ZstdError: corrupt data
                raise ValueError(f"corrupt {comp} data: {exc}") from exc
            started = True
            if out:
                yield out
            data = dec.unused_data if dec.eof else b""
    if started and not dec.eof:
        raise EOFError(f"{comp} stream ended before its end marker (truncated file)")


def _line_stream(unit: Unit):
    """Yield (byte offset, raw line) for the lines *starting* in the unit's range (decompressed).
    A compressed file is one unit; all its complete lines are yielded before a read error."""
    fh = _open_binary(unit.path)
    comp = _compression(unit.path)
    try:
        if comp is not None:
            yield from _compressed_lines(fh, comp)
            return
        stream = fh
        if unit.start > 0:
            stream.seek(unit.start - 1)
            stream.readline()  # the line containing start-1 belongs to the previous unit
        pos = stream.tell()
        while unit.end < 0 or pos < unit.end:  # end -1: the whole file
            line = stream.readline()
            if not line:
                break
            yield pos, line
            pos += len(line)
    finally:
        fh.close()


def _compressed_lines(fh, comp: str) -> Iterator[tuple[int, bytes]]:
    pos, tail = 0, b""
    for chunk in _decompressed_chunks(fh, comp):
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()  # the (possibly empty) part after the last newline
        for line in lines:
            yield pos, line + b"\n"
            pos += len(line) + 1
    if tail:
        yield pos, tail


class RecordReader:
    """Reads the records of one unit, yielding good documents and counting bad ones."""

    def __init__(self, text_field: str = "text", id_field: str = "id", keep_raw: bool = False):
        self.text_field = text_field
        self.id_field = id_field
        self.keep_raw = keep_raw

    def read(self, unit: Unit, drops: DropCounter) -> Iterator[Record]:
        """Yields records; after exhaustion ``self.lines`` is the number of lines/rows seen."""
        self.lines = 0
        if file_format(unit.path) == "parquet":
            yield from self._read_parquet(unit, drops)
        else:
            yield from self._read_jsonl(unit, drops)

    def _check_text(self, obj: dict, path: str, line: int, drops: DropCounter) -> str | None:
        text = obj.get(self.text_field)
        if text is None:
            drops.add("missing_text_field", path, line, f"no {self.text_field!r} field")
            return None
        if not isinstance(text, str):
            drops.add("text_not_string", path, line, type(text).__name__)
            return None
        if not text.strip():
            drops.add("empty_text", path, line)
            return None
        return text

    def _make_id(self, obj: dict, unit: Unit, where: str) -> str:
        doc_id = obj.get(self.id_field)
        if doc_id is None:  # stable whatever the unit split: <file>@<byte offset> or <file>:<row>
            return f"{os.path.basename(unit.path)}{where}"
        return str(doc_id)

    def _read_jsonl(self, unit: Unit, drops: DropCounter) -> Iterator[Record]:
        path = unit.path
        loads = json.loads
        n = 0
        try:
            for pos, raw in _line_stream(unit):
                n += 1
                self.lines = n
                try:
                    s = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    drops.add("invalid_utf8", path, n, str(exc))
                    continue
                if not s.strip():
                    drops.add("blank_line", path, n)
                    continue
                try:
                    obj = loads(s)
                except ValueError as exc:
                    drops.add("malformed_json", path, n, str(exc))
                    continue
                if not isinstance(obj, dict):
                    drops.add("malformed_json", path, n, f"a JSON {type(obj).__name__}, not an object")
                    continue
                text = self._check_text(obj, path, n, drops)
                if text is None:
                    continue
                try:
                    nbytes = len(text.encode("utf-8"))
                except UnicodeEncodeError as exc:  # lone surrogates from \\ud800 escapes
                    drops.add("invalid_utf8", path, n, str(exc))
                    continue
                where = f"@{pos}" if _compression(path) is None else f":{n}"
                yield Record(text, self._make_id(obj, unit, where), n, nbytes, obj if self.keep_raw else None)
        except (OSError, EOFError, ValueError) as exc:  # truncated gzip/zstd, I/O error
            # the unreadable rest of the file counts as one input record (so in = out + dropped)
            drops.add("read_error", path, n + 1, f"{type(exc).__name__}: {exc}")
            n += 1
        self.lines = n

    def _read_parquet(self, unit: Unit, drops: DropCounter) -> Iterator[Record]:
        import pyarrow.parquet as pq

        path = unit.path
        n = 0
        try:
            with _open_binary(path) as fh:
                pf = pq.ParquetFile(fh)
                names = set(pf.schema_arrow.names)
                if self.text_field not in names:
                    rows = pf.metadata.num_rows
                    if rows:
                        drops.add("missing_text_field", path, 1, f"no column {self.text_field!r}", n=rows)
                    self.lines = rows
                    return
                cols = None if self.keep_raw else [c for c in (self.text_field, self.id_field) if c in names]
                for batch in pf.iter_batches(batch_size=4096, columns=cols):
                    for obj in batch.to_pylist():
                        n += 1
                        self.lines = n
                        text = self._check_text(obj, path, n, drops)
                        if text is None:
                            continue
                        yield Record(text, self._make_id(obj, unit, f":{n}"), n, len(text.encode("utf-8")),
                                     obj if self.keep_raw else None)
        except (OSError, ValueError) as exc:
            drops.add("read_error", path, n + 1, f"{type(exc).__name__}: {exc}")
            n += 1
        self.lines = n


def line_offsets(units: list[Unit], lines_per_unit: list[int]) -> list[dict[str, int]]:
    """For each unit, {path: number of lines of that file in earlier units}."""
    seen: dict[str, int] = {}
    out = []
    for unit, n in zip(units, lines_per_unit):
        out.append({unit.path: seen.get(unit.path, 0)})
        seen[unit.path] = seen.get(unit.path, 0) + n
    return out
