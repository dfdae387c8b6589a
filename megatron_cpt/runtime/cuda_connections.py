"""``CUDA_DEVICE_MAX_CONNECTIONS``: set to 1 before CUDA initialises when tensor parallelism
needs its communication ordered, left alone everywhere else.

Why: megatron-core 0.16.1 issues a tensor-parallel all-gather / reduce-scatter and then the
GEMM that overlaps it; only with one hardware queue does the GPU start them in issue order
(tensor_parallel/layers.py:526-560, and the warning at :728 for sequence parallelism / async
grad all-reduce). NVIDIA's example scripts export it (examples/llama/train_llama3_8b_h100_fp8.sh).

Where it must not be 1: megatron-core's UCC pipeline backend asserts it is not 1
(parallel_state.py:1056) and Megatron-LM refuses FSDP with it (training/arguments.py); this
trainer uses neither (NCCL pipelines, DDP / distributed optimizer). A value already in the
environment is never overwritten, so a cluster that wants another value (e.g. 32 on Blackwell,
as NeMo's PerfEnvPlugin does) exports it. The variable is read when the CUDA context is
created, so :func:`apply` runs before ``init_distributed`` / ``setup_device``.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import MutableMapping

ENV = "CUDA_DEVICE_MAX_CONNECTIONS"


@dataclass(frozen=True)
class ConnectionSetting:
    value: str | None   # what the process runs with (None: unset, CUDA's default of 8)
    source: str         # "megatron-cpt" (set here) | "environment" (kept) | "unset"
    why: str

    def to_dict(self) -> dict:
        return asdict(self)


def wanted(tp: int) -> str | None:
    """"1" where TP communication must be ordered before dependent compute, else None.
    Sequence parallelism only exists with TP > 1, so TP decides."""
    return "1" if tp > 1 else None


def decide(tp: int, sequence_parallel: bool, environ: MutableMapping[str, str] | None = None
           ) -> ConnectionSetting:
    """What :func:`apply` would do in ``environ`` (default: this process), without doing it."""
    env = os.environ if environ is None else environ
    what = f"TP={tp}" + (" with sequence parallelism" if sequence_parallel and tp > 1 else "")
    if ENV in env:
        note = "" if wanted(tp) in (None, env[ENV]) else \
            f"; {what} wants 1 (TP communication may start after the GEMM it should overlap)"
        return ConnectionSetting(env[ENV], "environment", f"set before launch, kept{note}")
    if wanted(tp):
        return ConnectionSetting("1", "megatron-cpt", f"{what}: one hardware queue keeps TP "
                                 "communication ahead of the GEMM that overlaps it")
    return ConnectionSetting(None, "unset", f"{what}: no tensor-parallel communication to order; "
                             "CUDA's default lets DP overlap streams run concurrently")


def apply(tp: int, sequence_parallel: bool, environ: MutableMapping[str, str] | None = None
          ) -> ConnectionSetting:
    """Set the variable in ``environ`` (default: this process) where :func:`decide` says so."""
    env = os.environ if environ is None else environ
    setting = decide(tp, sequence_parallel, env)
    if setting.source == "megatron-cpt":
        env[ENV] = setting.value
    return setting


def shell_export(tp: int) -> str | None:
    """The sbatch line for a TP cell (keeps a value exported at submission), else None."""
    if not wanted(tp):
        return None
    return f'export {ENV}="${{{ENV}:-{wanted(tp)}}}"  # TP>1: order TP communication (docs/training.md)'
