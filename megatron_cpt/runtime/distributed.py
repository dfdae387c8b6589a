"""Distributed init from torchrun or SLURM variables, model-parallel groups, seeding."""
from __future__ import annotations

import os
import random
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from megatron_cpt.run_folder import master_port
from megatron_cpt.runtime.device import collective_device, setup_device


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist],
                             capture_output=True, text=True, check=True).stdout
        return out.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0].split("[")[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_dist_env() -> DistEnv:
    """torchrun variables first (RANK/WORLD_SIZE/LOCAL_RANK), then srun's (SLURM_PROCID...),
    else a single process on this machine."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        port = int(env.get("MASTER_PORT", master_port(int(env.get("SLURM_JOB_ID", "0")))))
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                       int(env.get("SLURM_LOCALID", 0)),
                       env.get("MASTER_ADDR") or _first_slurm_host(), port)
    return DistEnv(0, 1, 0, "127.0.0.1", _free_port())


def placement() -> dict:
    """Where every rank runs (collective): ``hosts`` in node order and per rank its host,
    SLURM node index and local rank, so a multi-node run's record says which rank ran on
    which node (a hang or a lost node is then traced to a host)."""
    env = os.environ
    mine = {"host": socket.gethostname(),
            "node_id": int(env.get("SLURM_NODEID", env.get("GROUP_RANK", 0))),
            "local_rank": int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))}
    ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    hosts = []
    for r in ranks:
        if r["host"] not in hosts:
            hosts.append(r["host"])
    return {"hosts": hosts, "ranks": [{"rank": i, **r} for i, r in enumerate(ranks)]}


def init_distributed(tp: int = 1, pp: int = 1, seed: int = 1234,
                     timeout_min: float = 15.0) -> DistEnv:
    """Initialize torch.distributed (NCCL on GPU, gloo on CPU), Megatron's model-parallel
    groups for ``tp`` x ``pp`` (DP is what remains) and all RNGs from ``seed``. A collective
    that waits ``timeout_min`` raises (training: ``train.collective_timeout_min``; torch's
    default, 30 minutes on NCCL, leaves a hung job idle for half an hour)."""
    from megatron.core import parallel_state

    denv = read_dist_env()
    device = setup_device()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", denv.master_addr)
        os.environ.setdefault("MASTER_PORT", str(denv.master_port))
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
            rank=denv.rank, world_size=denv.world_size,
            timeout=timedelta(minutes=timeout_min),
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             pipeline_model_parallel_size=pp)
    set_seed(seed)
    return denv


def set_seed(seed: int) -> None:
    """Seed python, numpy, torch and Megatron's model-parallel RNG tracker."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def all_reduce_values(values: list[float], op=dist.ReduceOp.SUM, group=None,
                      dtype: torch.dtype = torch.float64) -> list:
    """``values`` reduced elementwise over ``group`` (collective), as Python numbers. The
    tensor lives on :func:`collective_device`: a CPU tensor fails under NCCL."""
    t = torch.tensor(values, dtype=dtype, device=collective_device(group))
    dist.all_reduce(t, op=op, group=group)
    return t.tolist()


def broadcast_values(values: list[float], src: int, group=None,
                     dtype: torch.dtype = torch.float64) -> list:
    """Global rank ``src``'s ``values`` on every rank of ``group`` (collective; the others pass
    placeholders of the same length), through a tensor on :func:`collective_device`."""
    t = torch.tensor(values, dtype=dtype, device=collective_device(group))
    dist.broadcast(t, src=src, group=group)
    return t.tolist()


def shutdown() -> None:
    """Tear down Megatron groups and the process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
