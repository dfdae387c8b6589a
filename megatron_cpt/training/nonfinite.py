"""Non-finite steps never reach the weights or a checkpoint.

Megatron-core's ``optimizer.step()`` (0.16.1, fp32/bf16 without loss scaling) clips the
gradients by the grad norm and applies them even when that norm is NaN or Inf, so a single
bad step poisons every weight. :func:`checked_step` runs the same three stages (prepare the
grads, grad norm, clip + update) and stops before the update when the norm is not finite.
:class:`SpikeWatch` flags a loss far above its recent mean.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


def _optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


@torch.no_grad()
def checked_step(optimizer, device) -> tuple[bool, float]:
    """``optimizer.step()`` that applies the update only when the grad norm is finite on every
    rank; returns (applied, grad_norm). Collective."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    found_inf = optimizer.prepare_grads()  # the fp16 loss scaler's own check
    norm = float("nan") if found_inf else float(optimizer.get_grad_norm())
    # one flag for all ranks: the norm's reduction group need not span the whole world
    bad = torch.tensor([0.0 if math.isfinite(norm) else 1.0], device=device)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item() > 0:
        return False, norm
    for opt in _optimizers(optimizer):
        params = opt.get_parameters()
        if getattr(opt, "is_stub_optimizer", False) or not params or opt.config.clip_grad <= 0:
            continue
        clip_grad_by_total_norm_fp32(params, opt.config.clip_grad, norm,
                                     opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return bool(optimizer.step_with_ready_grads()), norm


@torch.no_grad()
def weights_finite(model, device) -> bool:
    """Whether every rank's parameters are finite (collective): a checkpoint of them is safe."""
    bad = any(not torch.isfinite(p).all() for p in model.parameters())
    flag = torch.tensor([1.0 if bad else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0


class SpikeWatch:
    """``train.spike_factor``: whether a loss exceeds ``factor`` x the mean of the last
    ``window`` losses (a warning event only; the step is applied). Off when factor is None."""

    def __init__(self, factor: float | None, window: int = 50):
        self.factor, self.window, self.recent = factor, window, []

    def spike(self, loss: float) -> float | None:
        """The running mean ``loss`` exceeded (then the loss stays out of it), else None."""
        if self.factor is None:
            return None
        mean = sum(self.recent) / len(self.recent) if self.recent else None
        if mean is not None and len(self.recent) >= min(10, self.window) and \
                loss > self.factor * mean:
            return mean
        self.recent = (self.recent + [loss])[-self.window:]
        return None
