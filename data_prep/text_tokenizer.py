"""Loading a local tokenizer (Hugging Face folder or SentencePiece ``.model``) for tokenization.

The HF path uses the ``tokenizers`` library directly (``encode_batch`` in Rust threads); it
gives the same ids as ``transformers.AutoTokenizer(text).input_ids`` (both apply the
tokenizer.json post-processor), which is what Megatron-LM's HuggingFaceTokenizer writes.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from megatron_cpt.errors import UsageError

DEFAULT_EOD = "<|endoftext|>"
_LOADED: dict = {}  # (file, sha256) -> loaded tokenizer, per process


def token_dtype(vocab_size: int):
    """Megatron's rule (``DType.optimal_dtype``): uint16 below 65,500 entries, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def _sha256_files(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(os.path.basename(p).encode() + b"\0")
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class TextTokenizer:
    """A picklable handle: the heavy tokenizer object is loaded lazily in each process."""

    def __init__(self, path: str, eod_token: str | None = None):
        path = os.path.abspath(os.path.expanduser(path))
        self.path = path
        if os.path.isdir(path):
            tj = os.path.join(path, "tokenizer.json")
            sp = os.path.join(path, "tokenizer.model")
            if os.path.isfile(tj):
                self.kind, self.file = "hf", tj
            elif os.path.isfile(sp):
                self.kind, self.file = "sentencepiece", sp
            else:
                raise UsageError(f"tokenizer folder {path!r} has no tokenizer.json or tokenizer.model: "
                                 "pass a Hugging Face tokenizer folder or a SentencePiece .model file")
        elif os.path.isfile(path) and path.endswith(".model"):
            self.kind, self.file = "sentencepiece", path
        elif os.path.isfile(path) and path.endswith(".json"):
            self.kind, self.file = "hf", path
        else:
            raise UsageError(f"tokenizer {path!r} not found: pass a local Hugging Face tokenizer folder "
                             "(with tokenizer.json) or a SentencePiece .model file")
        self._tok = None
        self.config = {}
        cfg = os.path.join(os.path.dirname(self.file), "tokenizer_config.json")
        if os.path.isfile(cfg):
            try:
                with open(cfg) as fh:
                    self.config = json.load(fh)
            except ValueError as exc:
                raise UsageError(f"tokenizer config {cfg!r} is not valid JSON ({exc}): fix or remove it") from exc
        tok = self._load()
        self.vocab_size = self._vocab_size(tok)
        self.eod_token, self.eod_id = self._resolve_eod(tok, eod_token)
        self.name = self._name()
        # the ids depend on tokenizer.json (or the .model) only; the EOD id is recorded separately
        self.sha256 = _sha256_files([self.file])
        self.dtype = token_dtype(self.vocab_size)

    # -- loading -----------------------------------------------------------------------------
    def _load(self):
        if self._tok is not None:
            return self._tok
        cached = _LOADED.get((self.file, getattr(self, "sha256", None)))
        if cached is not None:  # a worker process runs many tasks: load once per process
            self._tok = cached
            return cached
        try:
            if self.kind == "hf":
                from tokenizers import Tokenizer

                self._tok = Tokenizer.from_file(self.file)
            else:
                try:
                    import sentencepiece as spm
                except ImportError as exc:
                    raise UsageError("a SentencePiece .model needs the `sentencepiece` package: pip install sentencepiece") from exc
                self._tok = spm.SentencePieceProcessor(model_file=self.file)
            if getattr(self, "sha256", None):
                _LOADED[(self.file, self.sha256)] = self._tok
        except UsageError:
            raise
        except Exception as exc:  # noqa: BLE001 - any parse failure means an unreadable tokenizer
            raise UsageError(f"cannot read tokenizer {self.file!r} ({type(exc).__name__}: {str(exc)[:120]}): "
                             "pass a valid tokenizer.json folder or SentencePiece .model") from exc
        return self._tok

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tok"] = None
        return state

    def _vocab_size(self, tok) -> int:
        if self.kind == "hf":
            return tok.get_vocab_size(with_added_tokens=True)
        return tok.get_piece_size()

    def _resolve_eod(self, tok, eod_token):
        if self.kind == "hf":
            candidates = [eod_token] if eod_token else [DEFAULT_EOD, _token_str(self.config.get("eos_token"))]
            for cand in candidates:
                if cand and tok.token_to_id(cand) is not None:
                    return cand, tok.token_to_id(cand)
            raise UsageError(f"tokenizer {self.path!r} has no end-of-document token {candidates[0]!r}: "
                             "pass --eod-token with a token of its vocabulary")
        if eod_token:
            tid = tok.piece_to_id(eod_token)
            if tid == tok.unk_id() and eod_token != tok.id_to_piece(tok.unk_id()):
                raise UsageError(f"SentencePiece model has no piece {eod_token!r}: pass --eod-token with one of its pieces")
            return eod_token, tid
        if tok.eos_id() < 0:
            raise UsageError("SentencePiece model has no EOS piece: pass --eod-token")
        return tok.id_to_piece(tok.eos_id()), tok.eos_id()

    def _name(self) -> str:
        name = self.config.get("name_or_path") or ""
        if not name or os.path.isabs(str(name)):
            base = self.path if os.path.isdir(self.path) else os.path.splitext(self.path)[0]
            name = os.path.basename(base.rstrip("/"))
        return str(name)

    # -- encoding ----------------------------------------------------------------------------
    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        tok = self._load()
        if self.kind == "hf":
            return [e.ids for e in tok.encode_batch_fast(texts)] if hasattr(tok, "encode_batch_fast") \
                else [e.ids for e in tok.encode_batch(texts)]
        return tok.encode(texts)

    def decode(self, ids: list[int]) -> str:
        tok = self._load()
        if self.kind == "hf":
            return tok.decode(ids, skip_special_tokens=False)
        return tok.decode(ids)

    def info(self) -> dict:
        return {"name": self.name, "kind": self.kind, "path": self.path, "vocab_size": self.vocab_size,
                "eod_token": self.eod_token, "eod_id": self.eod_id, "sha256": self.sha256,
                "dtype": np.dtype(self.dtype).name}


def _token_str(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok
