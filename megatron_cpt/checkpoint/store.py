"""The on-disk checkpoint format shared by conversion, training and evaluation.

A checkpoint is a folder::

    CKPT/
      weights/        Megatron-core dist checkpoint (torch_dist): loads at any TP/PP
      model.yaml      the architecture (ModelConfig)
      tokenizer/      Hugging Face tokenizer files
      metadata.json   format, iteration, dtype, source, tensor hashes, ...

Folders are committed atomically: written under a temporary name next to the target,
then renamed, so a crash never leaves a half-written checkpoint under the final name.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from megatron_cpt.errors import UsageError
from megatron_cpt.models.qwen2 import ModelConfig

FORMAT = "megatron-cpt/1"
WEIGHTS, MODEL_YAML, TOKENIZER, METADATA = "weights", "model.yaml", "tokenizer", "metadata.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / METADATA).is_file() and (Path(path) / WEIGHTS).is_dir()


def read_metadata(ckpt: Path) -> dict[str, Any]:
    ckpt = Path(ckpt)
    if not is_checkpoint(ckpt):
        raise UsageError(f"{ckpt} is not a megatron-cpt checkpoint (no {METADATA} and "
                         f"{WEIGHTS}/); create one with `megatron-cpt convert hf-to-mcore`")
    meta = json.loads((ckpt / METADATA).read_text())
    if meta.get("format") != FORMAT:
        raise UsageError(f"{ckpt}: unknown checkpoint format {meta.get('format')!r}; expected {FORMAT}")
    return meta


def read_model_config(ckpt: Path) -> ModelConfig:
    read_metadata(ckpt)
    # seq_length: written by checkpoints made before ModelConfig dropped it (it was never read)
    return ModelConfig.load(Path(ckpt) / MODEL_YAML, retired=("seq_length",))


def export_dtype(meta: dict[str, Any], requested: str | None) -> str:
    """The dtype an export writes: ``requested`` or the checkpoint's own."""
    name = requested or meta.get("dtype", "float32")
    if name not in DTYPES:
        raise UsageError(f"unknown --dtype {name!r}; choose one of {sorted(DTYPES)}")
    return name


def tensor_sha256(t: torch.Tensor) -> str:
    """Hash of a tensor's bytes (dtype-exact; bf16 viewed as int16)."""
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse to overwrite an existing checkpoint (or any non-empty folder) unless forced."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        what = "a checkpoint" if is_checkpoint(out) else "files"
        raise UsageError(f"output folder {out} already holds {what}; choose another --out "
                         "or pass --force to replace it")


@contextmanager
def atomic_dir(final: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success rename it to ``final`` (replacing
    the old one only when ``force``). On error the temporary folder is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        if not force:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UsageError(f"{final} appeared while writing; pass --force to replace it")
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        final.rename(old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def write_metadata(ckpt: Path, meta: dict[str, Any]) -> None:
    """Atomic (temporary file, then rename): a reader sees the old or the new metadata."""
    tmp = Path(ckpt) / f".{METADATA}.tmp"
    tmp.write_text(json.dumps({"format": FORMAT, **meta}, indent=2))
    os.replace(tmp, Path(ckpt) / METADATA)


def save_weights(sharded_state_dict: dict, ckpt: Path) -> None:
    """Write a Megatron dist checkpoint of ``sharded_state_dict`` to ``ckpt/weights``
    (collective: every rank calls it)."""
    from megatron.core import dist_checkpointing

    weights = Path(ckpt) / WEIGHTS
    if torch.distributed.get_rank() == 0:
        weights.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(sharded_state_dict, str(weights))


def load_model_weights(model, ckpt: Path) -> None:
    """Load the model weights of ``ckpt`` into ``model`` at this run's TP/PP (resharding
    as needed). Optimizer state in the same checkpoint is ignored."""
    from megatron.core import dist_checkpointing

    weights = Path(ckpt) / WEIGHTS
    state = dist_checkpointing.load(model.sharded_state_dict(), str(weights))
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing:
        raise RuntimeError(f"checkpoint {ckpt} lacks weights for {missing[:5]}")


def load_model(ckpt: Path, tp: int = 1, pp: int = 1, dtype: str | None = None,
               local_spec: bool = False):
    """The one way to get a checkpoint's model: initialize TP/PP process groups, build this
    rank's GPTModel stage in ``dtype`` (default: the checkpoint's) and load its weights, in
    eval mode. ``local_spec`` names parameters as the local spec does (the conversion
    mapping's names) even where Transformer Engine is installed. Returns (model, config)."""
    from megatron_cpt.models.qwen2 import BuildOptions, build_gpt_model
    from megatron_cpt.runtime import init_distributed

    dtype_name = export_dtype(read_metadata(ckpt), dtype)
    cfg = read_model_config(ckpt)
    cfg.check_parallel(tp, pp)
    init_distributed(tp=tp, pp=pp, seed=0)
    spec = dict(use_te=False, attention_backend="local") if local_spec else {}
    gpt = build_gpt_model(cfg, BuildOptions(tp=tp, pp=pp, params_dtype=DTYPES[dtype_name],
                                            init_weights=False, **spec))
    load_model_weights(gpt, ckpt)
    gpt.eval()
    return gpt, cfg


def save_checkpoint(sharded_state_dict: dict, out: Path, model_cfg: ModelConfig,
                    meta: dict[str, Any], tokenizer_dir: Path | None = None) -> None:
    """Collective, atomic save of a full checkpoint folder from every rank's shards.

    Rank 0 names a temporary sibling folder; all ranks write their shards into it; rank 0
    writes metadata.json last and renames the folder to ``out``.
    """
    import torch.distributed as dist

    from megatron_cpt.checkpoint.hf_files import copy_tokenizer

    out = Path(out)
    rank = dist.get_rank()
    name = [f".{out.name}.tmp-{uuid.uuid4().hex[:8]}" if rank == 0 else None]
    dist.broadcast_object_list(name, src=0)
    tmp = out.parent / name[0]
    if rank == 0:
        tmp.mkdir(parents=True)
        model_cfg.save(tmp / MODEL_YAML)
        if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
            copy_tokenizer(Path(tokenizer_dir), tmp / TOKENIZER)
    save_weights(sharded_state_dict, tmp)
    dist.barrier()
    if rank == 0:
        write_metadata(tmp, meta)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    dist.barrier()
