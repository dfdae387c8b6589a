"""Hugging Face checkpoint folders: validation before loading, streaming reads, sharded writes."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Iterator

import torch

from megatron_cpt.errors import UsageError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
                   "generation_config.json")
INDEX_NAME = "model.safetensors.index.json"


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise UsageError(f"{path} not found; --hf must be a Hugging Face model folder")
    return json.loads(path.read_text())


def _safetensors_header(path: Path) -> dict:
    """Parse and check a .safetensors header; raise if the file is cut short."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise UsageError(f"safetensors shard {path} is truncated ({size} bytes); re-download it")
        (header_len,) = struct.unpack("<Q", raw)
        if 8 + header_len > size:
            raise UsageError(f"safetensors shard {path} is truncated (header runs past the end); "
                             "re-download it")
        header = json.loads(f.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise UsageError(f"safetensors shard {path} is truncated or corrupt: {size} bytes, header "
                         f"expects {8 + header_len + end}; re-download it")
    return header


def list_shards(hf_dir: Path) -> dict[Path, list[str]]:
    """Every safetensors shard of ``hf_dir`` with its tensor names, each shard checked
    for presence and length before any tensor is read."""
    index = hf_dir / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
        if not files:
            raise UsageError(f"no *.safetensors in {hf_dir}; save the model with "
                             "safe_serialization=True (PyTorch .bin files are not supported)")
    shards: dict[Path, list[str]] = {}
    for name in files:
        path = hf_dir / name
        if not path.is_file():
            raise UsageError(f"safetensors shard {path} listed in {INDEX_NAME} is missing; "
                             "download the complete checkpoint")
        shards[path] = [k for k in _safetensors_header(path) if k != "__metadata__"]
    return shards


def iter_tensors(shards: dict[Path, list[str]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream ``(name, tensor)`` one shard at a time (only one shard is ever memory-mapped)."""
    from safetensors import safe_open

    for path in shards:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def tokenizer_size(tok_dir: Path) -> int | None:
    """Number of tokens the tokenizer in ``tok_dir`` can emit (None when there is none)."""
    if not (tok_dir / "tokenizer.json").is_file() and not (tok_dir / "vocab.json").is_file():
        return None
    from transformers import AutoTokenizer

    try:
        return len(AutoTokenizer.from_pretrained(str(tok_dir)))
    except Exception as exc:  # noqa: BLE001 - report any loader failure the same way
        raise UsageError(f"cannot load the tokenizer in {tok_dir}: {exc}") from exc


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


class ShardedSafetensorsWriter:
    """Write tensors into ``model-0000i-of-0000n.safetensors`` shards of at most
    ``max_shard_bytes`` plus an index, holding at most one shard in memory."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = 5 * 2**30):
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._written: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.detach().contiguous().clone()
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        tmp_name = f"shard-{len(self._written):05d}.safetensors"
        save_file(self._buffer, str(self.out_dir / tmp_name), metadata={"format": "pt"})
        self._written.append((tmp_name, list(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> list[str]:
        if self._buffer or not self._written:
            self._flush()
        n = len(self._written)
        if n == 1:
            (self.out_dir / self._written[0][0]).rename(self.out_dir / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for i, (tmp_name, keys) in enumerate(self._written):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out_dir / tmp_name).rename(self.out_dir / final)
            names.append(final)
            weight_map.update({k: final for k in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2))
        return names
