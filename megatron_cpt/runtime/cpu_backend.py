"""Run Megatron-core unmodified on CPU (gloo, fp32) for tests and dry runs.

Megatron-core assumes CUDA in a handful of places. This module redirects exactly
those, and nothing else, to the CPU. It is imported and activated only by
:func:`megatron_cpt.runtime.device.setup_device` when ``torch.cuda.is_available()``
is false; a GPU run never imports it.

Each redirect names the Megatron-core 0.16.1 call sites it serves (``activate`` refuses
another version: see :mod:`megatron_cpt.runtime.mcore_patches`):

1. ``torch.cuda.current_device()`` answers ``"cpu"``
   - RoPE inverse frequencies (models/common/embeddings/rotary_pos_embedding.py),
     attention masks and buffers (transformer/attention.py, tensor_parallel/layers.py,
     distributed/param_and_grad_buffer.py).
2. ``Tensor.cuda()`` returns the tensor itself; ``torch.cuda.synchronize()`` is a no-op
   - pipeline p2p buffers, timers, dist-checkpoint loading (``.cuda()`` on loaded shards).
3. The CUDA RNG tracker is backed by the CPU generator
   - ``torch.cuda.manual_seed / get_rng_state / set_rng_state`` and
     ``tensor_parallel.random._get_cuda_rng_state / _set_cuda_rng_state`` used by
     ``model_parallel_cuda_manual_seed`` and ``CudaRNGStatesTracker.add / fork``.
4. Factory calls with an explicit ``device='cuda'`` are rewritten to the CPU
   - optimizer/optimizer.py (``found_inf``, ``_scale_one``), optimizer/grad_scaler.py,
     optimizer/clip_grads.py (``total_norm_cuda``, ``dummy_overflow_buf``),
     transformer/utils.py (causal masks); done by a ``TorchFunctionMode``. Function modes
     are thread-local and autograd replays activation recomputation on its own thread, so
     ``get_default_causal_mask`` (fusions/fused_softmax.py, reached again while recomputing
     core attention) is also replaced by name.
5. ``Tensor.type()`` reports CUDA type names for CPU tensors
   - optimizer/clip_grads.py (``assert param.grad.type() == 'torch.cuda.FloatTensor'``),
     optimizer/optimizer.py and distrib_optimizer.py (main-param dtype dispatch).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

_ORIGINALS: dict[tuple[Any, str], Any] = {}
_MODE: "_CudaDeviceToCpu | None" = None


def is_active() -> bool:
    """True once :func:`activate` has patched torch / Megatron-core."""
    return bool(_ORIGINALS)


def _patch(owner: Any, name: str, replacement: Any) -> None:
    _ORIGINALS.setdefault((owner, name), getattr(owner, name))
    setattr(owner, name, replacement)


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaDeviceToCpu(TorchFunctionMode):
    """Redirect 4: rewrite ``device='cuda'`` (keyword or ``.to('cuda')``) to the CPU."""

    def __torch_function__(self, func: Callable, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func in (torch.Tensor.to, torch.Tensor.new_tensor) and args:
            args = tuple("cpu" if _is_cuda_device(a) else a for a in args)
        return func(*args, **kwargs)


def _cpu_type(self: torch.Tensor, dtype=None, non_blocking: bool = False, **kwargs):
    """Redirect 5: ``t.type()`` -> ``'torch.cuda.FloatTensor'`` for a CPU float tensor."""
    original = _ORIGINALS[(torch.Tensor, "type")]
    if dtype is None and not kwargs:
        name = original(self)
        if self.device.type == "cpu" and name.startswith("torch.") and ".cuda." not in name:
            return name.replace("torch.", "torch.cuda.", 1)
        return name
    return original(self, dtype, non_blocking, **kwargs)


def activate() -> None:
    """Install the five redirects (idempotent). Refuses to run when CUDA is present."""
    global _MODE
    if torch.cuda.is_available():
        raise RuntimeError("cpu_backend must not be activated when CUDA is available")
    if is_active():
        return
    from megatron.core.tensor_parallel import random as mcore_random

    from megatron_cpt.runtime.mcore_patches import require_tested_mcore

    require_tested_mcore("cpu_backend")  # the call sites above are 0.16.1's

    # 1. current device
    _patch(torch.cuda, "current_device", lambda: "cpu")
    # 2. .cuda() and synchronize
    _patch(torch.Tensor, "cuda", lambda self, *a, **k: self)
    _patch(torch.cuda, "synchronize", lambda *a, **k: None)
    # 3. RNG: the CPU default generator plays the CUDA generator's role.
    # (torch.manual_seed itself calls torch.cuda.manual_seed_all, which is lazy and harmless
    # without CUDA, so seed the CPU generator directly here.)
    _patch(torch.cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(seed))
    _patch(torch.cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state())
    _patch(torch.cuda, "set_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
    _patch(mcore_random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
    _patch(mcore_random, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
    # 5. CUDA type names
    _patch(torch.Tensor, "type", _cpu_type)
    # 4. device='cuda' factories
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as mcore_utils

    cpu_mask = functools.lru_cache(maxsize=16)(
        lambda sq: torch.triu(torch.ones(sq, sq), diagonal=1).bool())
    _patch(mcore_utils, "get_default_causal_mask", cpu_mask)
    _patch(fused_softmax, "get_default_causal_mask", cpu_mask)
    _MODE = _CudaDeviceToCpu()
    _MODE.__enter__()


def deactivate() -> None:
    """Undo :func:`activate` (used by tests)."""
    global _MODE
    if _MODE is not None:
        _MODE.__exit__(None, None, None)
        _MODE = None
    for (owner, name), original in reversed(list(_ORIGINALS.items())):
        setattr(owner, name, original)
    _ORIGINALS.clear()


@contextlib.contextmanager
def active():
    """Context manager form, for tests."""
    activate()
    try:
        yield
    finally:
        deactivate()
