"""``PREFIX.manifest.json``: what a tokenized dataset contains and how it was made.

The trainer calls :func:`verify_prefix` before using a prefix: it refuses missing files and
files whose size or sha256 differ from the manifest, and returns the manifest (whose
``tokenizer.sha256`` / ``tokenizer.name`` it compares with the model's tokenizer).

Fields: ``format_version``, ``kind``, ``documents``, ``tokens``, ``bytes`` (UTF-8 bytes of the
tokenized text), ``documents_in``, ``dropped`` (``{reason: count}``), ``dropped_examples``
(``{reason: [{file, line, detail}]}``), ``tokenizer`` (``name``, ``kind``, ``path``,
``vocab_size``, ``eod_token``, ``eod_id``, ``sha256``, ``dtype``), ``bin_sha256``,
``idx_sha256``, ``bin_bytes``, ``idx_bytes``, ``inputs``, ``config``, ``created``, ``seconds``.
"""
from __future__ import annotations

import datetime
import json
import os

from megatron_cpt.errors import UsageError

FORMAT_VERSION = 1


def build_manifest(kind, files, tokenizer, inputs, documents_in, dropped, nbytes, config, seconds) -> dict:
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "documents": files["documents"],
        "tokens": files["tokens"],
        "bytes": int(nbytes),
        "documents_in": int(documents_in),
        "dropped": dropped.to_dict()["counts"],
        "dropped_examples": dropped.to_dict()["examples"],
        "tokenizer": tokenizer,
        "bin_sha256": files["bin_sha256"],
        "idx_sha256": files["idx_sha256"],
        "bin_bytes": files["bin_bytes"],
        "idx_bytes": files["idx_bytes"],
        "inputs": list(inputs),
        "config": config,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(float(seconds), 3),
    }
    if manifest["documents_in"] != manifest["documents"] + sum(manifest["dropped"].values()):
        raise RuntimeError("document accounting mismatch: in != out + dropped (this is a bug)")
    return manifest


def write_prefix(prefix, documents: list[list[int]], tokenizer_dir, eod_id: int, vocab_size: int) -> dict:
    """``prefix.bin/.idx`` + manifest from token lists (tests and toy data; ``prep tokenize``
    writes the same files from text at scale). ``vocab_size`` (the model's embedding rows)
    picks the token dtype; the manifest's tokenizer entry is the tokenizer's own."""
    from data_prep.indexed import write_documents
    from data_prep.io import DropCounter
    from data_prep.text_tokenizer import TextTokenizer, token_dtype

    prefix = str(prefix)
    tok = TextTokenizer(str(tokenizer_dir))
    if tok.eod_id != eod_id:
        raise ValueError(f"eod_id {eod_id} differs from the tokenizer's {tok.eod_id}")
    files = write_documents(prefix, documents, token_dtype(vocab_size))
    manifest = build_manifest("tokenized", files, tok.info(), inputs=[], documents_in=len(documents),
                              dropped=DropCounter(), nbytes=0, seconds=0.0,
                              config={"writer": "data_prep.manifest.write_prefix"})
    write_manifest(prefix, manifest)
    return manifest


def write_manifest(prefix: str, manifest: dict) -> str:
    path = prefix + ".manifest.json"
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=False)
        fh.write("\n")
    os.replace(tmp, path)
    return path


def _strip(prefix: str) -> str:
    for suffix in (".manifest.json", ".bin", ".idx"):
        if prefix.endswith(suffix):
            return prefix[: -len(suffix)]
    return prefix


def load_manifest(prefix: str) -> dict:
    prefix = _strip(prefix)
    path = prefix + ".manifest.json"
    if not os.path.isfile(path):
        raise UsageError(f"{path} is missing: tokenize the data with `megatron-cpt prep tokenize` first")
    try:
        with open(path) as fh:
            return json.load(fh)
    except ValueError as exc:
        raise UsageError(f"{path} is not valid JSON ({exc}): re-run `megatron-cpt prep tokenize`") from exc


STAMP_SUFFIX = ".verified.json"


def _stamp_of(prefix: str, manifest: dict) -> dict:
    """What a verified stamp vouches for: each file's size, mtime, ctime (which no tool can
    set back) and the manifest's sha256."""
    stamp = {"tokenizer_sha256": manifest["tokenizer"].get("sha256")}
    for ext in ("bin", "idx"):
        st = os.stat(f"{prefix}.{ext}")
        stamp[ext] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
                      "sha256": manifest.get(f"{ext}_sha256")}
    return stamp


def _stamped(prefix: str, manifest: dict) -> bool:
    """True when ``PREFIX.verified.json`` says these very files were hashed and matched."""
    try:
        with open(prefix + STAMP_SUFFIX) as fh:
            return json.load(fh) == _stamp_of(prefix, manifest)
    except (OSError, ValueError):
        return False


def _write_stamp(prefix: str, manifest: dict) -> None:
    """Record a successful hash check; a read-only data folder just means hashing again."""
    tmp = f"{prefix}{STAMP_SUFFIX}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as fh:
            json.dump(_stamp_of(prefix, manifest), fh)
        os.replace(tmp, prefix + STAMP_SUFFIX)
    except OSError:
        if os.path.exists(tmp):
            os.unlink(tmp)


def verify_prefix(prefix: str, check_hashes: bool = True, tokenizer: str | None = None,
                  eod_token: str | None = None) -> dict:
    """Check ``prefix.bin/.idx`` against ``prefix.manifest.json``; return the manifest.

    Raises UsageError when a file is missing, or its size or sha256 differ from the manifest.
    ``check_hashes=False`` checks sizes only (fast for very large datasets). With ``tokenizer``
    (a tokenizer folder or .model), also refuses data tokenized with a different tokenizer
    (sha256 of tokenizer.json / .model) or a different EOD id.

    Hashes are checked once: a match is stamped in ``PREFIX.verified.json`` (size, mtime and
    sha256 of each file, the tokenizer's sha256) and later calls trust the stamp while size
    and mtime are unchanged; any write to the files changes the mtime and they are re-hashed.
    """
    from data_prep.indexed import sha256_file

    prefix = _strip(prefix)
    manifest = load_manifest(prefix)
    for ext in ("bin", "idx"):
        if not os.path.isfile(f"{prefix}.{ext}"):
            raise UsageError(f"{prefix}.{ext} is missing: re-run `megatron-cpt prep tokenize` for this prefix")
    check_accounting(prefix, manifest)
    hash_now = check_hashes and not _stamped(prefix, manifest)
    for ext in ("bin", "idx"):
        path = f"{prefix}.{ext}"
        size = os.path.getsize(path)
        if size != manifest.get(f"{ext}_bytes"):
            raise UsageError(f"{path} has {size} bytes but its manifest says {manifest.get(f'{ext}_bytes')}: "
                             "the file was modified or truncated; re-run `megatron-cpt prep tokenize`")
        if hash_now and sha256_file(path) != manifest.get(f"{ext}_sha256"):
            raise UsageError(f"{path} does not match the sha256 in its manifest: the file was modified; "
                             "re-run `megatron-cpt prep tokenize`")
    if tokenizer is not None:
        from data_prep.text_tokenizer import TextTokenizer

        tok = TextTokenizer(tokenizer, eod_token or manifest["tokenizer"].get("eod_token"))
        want = manifest["tokenizer"]
        if tok.sha256 != want.get("sha256") or tok.eod_id != want.get("eod_id"):
            raise UsageError(f"{prefix} was tokenized with {want.get('name')!r} (sha256 {want.get('sha256', '')[:12]}, "
                             f"EOD {want.get('eod_id')}), not {tok.name!r} (sha256 {tok.sha256[:12]}, EOD "
                             f"{tok.eod_id}): re-tokenize the data or use the matching tokenizer")
    itemsize = 4 if manifest["tokenizer"]["vocab_size"] >= 65500 else 2
    if manifest["bin_bytes"] != manifest["tokens"] * itemsize:
        raise UsageError(f"{prefix}.manifest.json is inconsistent (tokens x {itemsize} bytes != bin size): "
                         "re-run `megatron-cpt prep tokenize`")
    if hash_now:  # every check passed: later launches need not read the files again
        _write_stamp(prefix, manifest)
    return manifest


def check_accounting(prefix: str, manifest: dict) -> None:
    """Every input document is either written or dropped for a named reason."""
    dropped = manifest.get("dropped") or {}
    written, docs_in = manifest.get("documents", 0), manifest.get("documents_in", 0)
    if docs_in != written + sum(dropped.values()):
        reasons = ", ".join(f"{k}={v}" for k, v in dropped.items()) or "none"
        raise UsageError(f"{prefix}.manifest.json: document accounting does not add up: "
                         f"{docs_in} in != {written} written + dropped ({reasons}); the manifest "
                         "was edited or its run was cut short: re-run `megatron-cpt prep tokenize`")


def stats_rows(prefixes: list[str]) -> list[dict]:
    rows = []
    for p in prefixes:
        m = load_manifest(p)
        rows.append({"prefix": _strip(p), "documents": m["documents"], "tokens": m["tokens"],
                     "MB": m["bytes"] / 1e6, "tok/doc": m["tokens"] / max(1, m["documents"]),
                     "dropped": sum(m["dropped"].values()), "tokenizer": m["tokenizer"]["name"],
                     "vocab": m["tokenizer"]["vocab_size"], "sha256": m["bin_sha256"][:12]})
    return rows


def format_table(rows: list[dict], floatfmt: str = "{:,.2f}") -> str:
    if not rows:
        return "(nothing)"
    cols = list(rows[0].keys())

    def fmt(v):
        if isinstance(v, float):
            return floatfmt.format(v)
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)),
             "  ".join("-" * w for w in widths)]
    for row in cells:
        lines.append("  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(row, widths)))
    return "\n".join(lines)


def _numeric(s: str) -> bool:
    return s.replace(",", "").replace(".", "", 1).lstrip("-").isdigit()
