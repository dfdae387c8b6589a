"""Pick the device for this process; on a CPU-only machine activate the CPU backend.

Also the two device answers every other module asks for, so no file decides them itself:
:func:`compute_device` (where this rank's model and batches live) and :func:`collective_device`
(where a tensor handed to a collective must live: NCCL takes CUDA tensors only and fails a
CPU one with "No backend type associated with device type cpu", which gloo-tested code never
sees).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup_device() -> torch.device:
    """Return the device this rank computes on.

    With CUDA: ``cuda:LOCAL_RANK`` and nothing patched. Without CUDA: the CPU, after
    activating :mod:`megatron_cpt.runtime.cpu_backend` (imported only on this path).
    """
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    from megatron_cpt.runtime import cpu_backend

    cpu_backend.activate()
    return torch.device("cpu")


def compute_device() -> torch.device:
    """The device :func:`setup_device` chose for this rank (call it after that): the current
    CUDA device where CUDA is present, else the CPU. ``build_gpt_model`` puts the model there
    whatever a caller passes, so code that builds a model says this device, not a literal."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def device_for_backend(backend: str) -> torch.device:
    """Where a process-group backend named ``backend`` takes tensors: the CPU when it accepts
    CPU tensors (gloo, ucc, mpi, a ``"cpu:gloo,cuda:nccl"`` pair), else its accelerator
    (nccl: ``cuda``, which torch resolves to the current CUDA device that :func:`setup_device`
    set). Unknown backends raise rather than guess the CPU."""
    if ":" in backend:  # "cpu:gloo,cuda:nccl": the device types are spelled out
        kinds = [part.split(":")[0].strip() for part in backend.split(",")]
    else:
        kinds = dist.Backend.backend_capability.get(backend.lower())
        if not kinds:
            raise ValueError(f"process-group backend {backend!r} names no device types; "
                             f"known: {sorted(dist.Backend.backend_capability)}")
    return torch.device("cpu") if "cpu" in kinds else torch.device(kinds[0])


def collective_device(group=None) -> torch.device:
    """The device for tensors handed to a collective on ``group`` (default: the world)."""
    return device_for_backend(str(dist.get_backend(group)))
