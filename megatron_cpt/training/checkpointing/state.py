"""What a resume checkpoint holds besides files: the model and optimizer sharded state dicts,
each rank's RNG states, and torch Adam's ``step`` (with megatron-core 0.16.1's load quirks)."""
from __future__ import annotations

import random

import numpy as np
import torch

from megatron_cpt.training.checkpointing.layout import DP_RESHARDABLE, FULLY_RESHARDABLE


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


def _state_dicts(gpt, optimizer, is_loading: bool, optimizer_format: str = DP_RESHARDABLE) -> dict:
    """Model + optimizer sharded state; ``optimizer_format`` is megatron-core's distributed-
    optimizer sharding type (the one a checkpoint was saved with, when loading)."""
    model_sd = gpt.sharded_state_dict()
    return {"model": model_sd,
            "optimizer": optimizer.sharded_state_dict(
                model_sd, is_loading=is_loading,
                metadata={"distrib_optim_sharding_type": optimizer_format})}


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


def _load_optimizer_state(optimizer, state: dict) -> None:
    """``optimizer.load_state_dict``, except for megatron-core 0.16.1's ``fully_reshardable``
    load with torch Adam (no Apex/TE): it copies every state key of a param from the loaded
    tensors, torch Adam's ``step`` included, which they lack (KeyError 'step'). So load the param
    groups first, then the parameter state with ``step`` set aside (:func:`_restore_adam_step`
    sets the saved one afterwards)."""
    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    parts = [state] if len(opts) == 1 else [state[k] for k in sorted(state)]
    if not any(p.get("param_state_sharding_type") == FULLY_RESHARDABLE for p in parts):
        optimizer.load_state_dict(state)
        return
    for opt, part in zip(opts, parts):
        param_state = part.pop("param_state")
        opt.load_state_dict(part)
        steps = {p: st.pop("step") for p, st in opt.optimizer.state.items() if "step" in st}
        opt.load_parameter_state_from_fully_reshardable(param_state)
        for p, step in steps.items():
            opt.optimizer.state[p]["step"] = step
