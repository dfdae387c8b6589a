"""Pick the device for this process; on a CPU-only machine activate the CPU backend."""
from __future__ import annotations

import os

import torch


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
