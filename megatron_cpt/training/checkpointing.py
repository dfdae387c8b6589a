"""Run checkpoints: ``RUN/checkpoints/iter_0000100/`` folders in the checkpoint-store format.

Each run checkpoint is a regular store checkpoint (``weights/``, ``model.yaml``, ``tokenizer/``,
``metadata.json``), so conversion and evaluation read it like a converted one; training adds:

* in ``weights/`` (one Megatron dist checkpoint): the model *and* the optimizer state
  (distributed optimizer in ``fully_sharded_model_space`` form);
* ``trainer/rank_NNNNN.pt``: each rank's RNG states (python, numpy, torch, CUDA, Megatron's
  model-parallel tracker);
* ``metadata.json``: kind ``trained``, iteration, consumed_samples, tokens, flops, the
  scheduler state and the config hash.

Commit protocol (a crash at any point leaves the previous checkpoint intact):
  1. all ranks write into ``checkpoints/.iter_N.tmp/``;
  2. barrier; rank 0 writes ``metadata.json`` last, renames the folder to ``iter_N``;
  3. rank 0 rewrites ``checkpoints/latest`` (write ``latest.tmp``, fsync, rename);
  4. rank 0 applies retention (keep the last k plus the evaluation grid).
``latest`` is the only pointer that resume trusts; leftover ``.tmp`` folders are removed at
the next start.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_cpt.checkpoint import store
from megatron_cpt.runtime import mcore_patches
from megatron_cpt.run_folder import RunFolder
from megatron_cpt.training import fault_hooks

TRAINER = "trainer"


def iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The committed checkpoint ``latest`` points at, or None on a fresh run."""
    run = RunFolder(run_dir)
    name = run.latest_name()
    if name is None:
        return None
    ckpt = run.checkpoints / name
    return ckpt if store.is_checkpoint(ckpt) else None


def clean_stale(run_dir: Path) -> list[str]:
    """Remove half-written checkpoint folders left by a crash (rank 0, before training)."""
    root = RunFolder(run_dir).checkpoints
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".") and (".tmp" in p.name or ".old" in p.name):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return removed


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _state_dicts(gpt, optimizer, is_loading: bool) -> dict:
    model_sd = gpt.sharded_state_dict()
    return {"model": model_sd,
            "optimizer": optimizer.sharded_state_dict(
                model_sd, is_loading=is_loading,
                metadata={"distrib_optim_sharding_type": "dp_reshardable"})}




def save(run_dir: Path, iteration: int, gpt, optimizer, scheduler, meta: dict,
         pretrained: Path, keep_last: int, keep_iterations: set[int]) -> Path:
    """Collective: every rank calls it. Returns the committed folder."""
    from megatron.core import dist_checkpointing

    mcore_patches.signal_proof_writer_queue()
    rank = dist.get_rank()
    root = RunFolder(run_dir).checkpoints
    final = root / iter_name(iteration)
    tmp = root / f".{iter_name(iteration)}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / store.WEIGHTS).mkdir(parents=True)
        (tmp / TRAINER).mkdir()
    dist.barrier()
    dist_checkpointing.save(_state_dicts(gpt, optimizer, is_loading=False), str(tmp / store.WEIGHTS))
    torch.save(_rng_state(), tmp / TRAINER / f"rank_{rank:05d}.pt")
    dist.barrier()
    fault_hooks.crash_if_planned("crash_in_save", iteration)
    if rank == 0:
        shutil.copy2(Path(pretrained) / store.MODEL_YAML, tmp / store.MODEL_YAML)
        shutil.copytree(Path(pretrained) / store.TOKENIZER, tmp / store.TOKENIZER)
        store.write_metadata(tmp, {"kind": "trained", "iteration": iteration,
                                   "scheduler": scheduler.state_dict(),
                                   "adam_step": _adam_step(optimizer),
                                   "world_size": dist.get_world_size(), **meta})
        if final.exists():  # an uncommitted folder of the same iteration (crash after rename)
            old = root / f".{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        _write_latest(RunFolder(run_dir).latest_pointer, final.name)
        _retain(root, keep_last, keep_iterations)
    dist.barrier()
    return final


def _write_latest(pointer: Path, name: str) -> None:
    """The run folder's ``checkpoints/latest``; only this module writes it."""
    tmp = pointer.with_name(pointer.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, pointer)


def _retain(root: Path, keep_last: int, keep_iterations: set[int]) -> None:
    its = sorted(int(p.name[5:]) for p in root.glob("iter_*") if p.name[5:].isdigit())
    for it in its[:-keep_last] if len(its) > keep_last else []:
        if it not in keep_iterations:
            shutil.rmtree(root / iter_name(it), ignore_errors=True)


def _torch_optimizers(optimizer) -> list:
    return [opt.optimizer for opt in getattr(optimizer, "chained_optimizers", [optimizer])]


def _adam_step(optimizer) -> float | None:
    """torch Adam's per-param ``step`` (None for fused optimizers that keep it elsewhere)."""
    for inner in _torch_optimizers(optimizer):
        for st in inner.state.values():
            if isinstance(st.get("step"), torch.Tensor):
                return float(st["step"])
    return None


def _init_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer the state tensors a loaded checkpoint will overwrite.

    torch's Adam creates its state lazily at the first step, but Megatron-core's
    ``DistributedOptimizer.state_dict()`` (0.16.1, without Apex/TE) asserts that every
    param state has one common ``step``; a freshly built optimizer has none, so resume
    would fail before loading. TE/Apex fused optimizers use Megatron's own ``init_state_fn``.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            for group in inner.param_groups:
                for p in group["params"]:
                    if not inner.state[p]:
                        inner.state[p].update(step=torch.tensor(0.0),
                                              exp_avg=torch.zeros_like(p.data),
                                              exp_avg_sq=torch.zeros_like(p.data))
        elif getattr(opt, "init_state_fn", None) is not None:
            opt.init_state_fn(inner, getattr(opt, "config", None))


def _restore_adam_step(optimizer, step: float | None) -> None:
    """Megatron-core 0.16.1's non-Apex/TE load path does not restore torch Adam's ``step``
    (it comes back as the template's value) and, where it sets one, shares one tensor
    across all params (foreach Adam then adds 1 per param per step). Set an own copy of
    the saved step on every param state."""
    if step is None:
        return
    for inner in _torch_optimizers(optimizer):
        for st in inner.state.values():
            if "step" in st:
                st["step"] = torch.tensor(step, dtype=torch.float32)


def load(ckpt: Path, gpt, optimizer, scheduler) -> dict:
    """Full resume (collective): model, optimizer, scheduler, RNG. Returns the metadata."""
    from megatron.core import dist_checkpointing

    meta = store.read_metadata(ckpt)
    if meta.get("world_size") != dist.get_world_size():
        from megatron_cpt.errors import UsageError
        raise UsageError(f"{ckpt} was written by {meta.get('world_size')} ranks; resume it with "
                         "the same number of processes and the same TP/PP")
    _init_optimizer_state(optimizer)
    state = dist_checkpointing.load(_state_dicts(gpt, optimizer, is_loading=True),
                                    str(Path(ckpt) / store.WEIGHTS))
    with torch.no_grad():  # fp32 main params are views of the (leaf) model params
        gpt.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
    _restore_adam_step(optimizer, meta.get("adam_step"))
    scheduler.load_state_dict(meta["scheduler"])
    rng = torch.load(Path(ckpt) / TRAINER / f"rank_{dist.get_rank():05d}.pt", weights_only=False)
    _set_rng_state(rng)
    return meta


def read_latest_meta(run_dir: Path) -> dict | None:
    ckpt = latest_checkpoint(run_dir)
    return None if ckpt is None else json.loads((ckpt / store.METADATA).read_text())
