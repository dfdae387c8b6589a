"""How the trainer builds its model: the ``BuildOptions`` of a ``TrainConfig``, in one place so
that preflight checks exactly the ``TransformerConfig`` the launch will build."""
from __future__ import annotations

import torch

from megatron_cpt.models.qwen2 import BuildOptions
from megatron_cpt.training.config import TrainConfig


def _fp8_extra(cfg: TrainConfig) -> dict:
    p = cfg.precision
    if not p.fp8:
        return {}
    extra = {"fp8": p.fp8, "fp8_recipe": p.fp8_recipe}
    if p.fp8_bf16_first_layers or p.fp8_bf16_last_layers:
        extra.update(first_last_layers_bf16=True, num_layers_at_start_in_bf16=p.fp8_bf16_first_layers,
                     num_layers_at_end_in_bf16=p.fp8_bf16_last_layers)
    return extra


def _memory_extra(cfg: TrainConfig) -> dict:
    """TransformerConfig fields for activation recomputation (``memory`` section)."""
    m = cfg.memory
    if m.recompute == "selective":
        return {"recompute_granularity": "selective"}
    if m.recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": m.recompute_method,
                "recompute_num_layers": m.recompute_num_layers}
    return {}


def build_options(cfg: TrainConfig, model_cfg, dtype: torch.dtype, cuda: bool) -> BuildOptions:
    """The options of this run's model; fusions are resolved from ``cfg.model`` and this
    machine (models/fusions.py) when the config is built."""
    return BuildOptions(
        tp=cfg.parallel.tp, pp=cfg.parallel.pp, params_dtype=dtype,
        use_te=None if cuda else False,
        sequence_parallel=cfg.parallel.sequence_parallel,
        attention_backend=cfg.model.attention_backend,
        # init_weights must stay True even though the checkpoint overwrites every weight:
        # Megatron-core (0.16.1, tensor_parallel/layers.py) only marks weights as
        # tensor-parallel inside its init functions; without the marks the grad norm (and
        # clipping) ignores TP rank > 0 shards.
        init_weights=True,
        fusion_request=cfg.model,
        extra={**_fp8_extra(cfg), **_memory_extra(cfg)})
