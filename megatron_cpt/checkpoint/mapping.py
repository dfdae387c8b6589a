"""Hugging Face Qwen2 <-> Megatron-core GPTModel, as one declarative table.

Each :class:`Mapping` says which HF tensors one Megatron parameter is built from and by
which transform. Megatron names are those of the local layer spec's ``named_parameters()``
at TP1/PP1; the dist checkpoint stores them under the TE names through the spec's
``sharded_state_dict_keys_map``, so the same table serves both specs.

Transforms:
- ``copy``: same tensor.
- ``qkv``: Megatron's fused QKV is interleaved per query group:
  ``[q heads of group g, k_g, v_g]`` for g in groups, for the weight and the bias.
- ``gate_up``: SwiGLU's ``linear_fc1`` is ``cat(gate_proj, up_proj)``.
- ``vocab``: embedding / output rows are zero-padded to ``padded_vocab_size`` and pruned
  back to the HF row count on export.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_cpt.models.qwen2 import ModelConfig


@dataclass(frozen=True)
class Mapping:
    mcore: str
    hf: tuple[str, ...]
    transform: str = "copy"
    tied: bool | None = None  # applies only when tie_word_embeddings == tied (None: always)


GLOBAL_MAPPINGS = (
    Mapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    Mapping("decoder.final_layernorm.weight", ("model.norm.weight",)),
    # Tied models have no lm_head.weight: the output layer reuses the embedding.
    Mapping("output_layer.weight", ("lm_head.weight",), "vocab", tied=False),
)

_L, _H = "decoder.layers.{i}.", "model.layers.{i}."
LAYER_MAPPINGS = (
    Mapping(_L + "input_layernorm.weight", (_H + "input_layernorm.weight",)),
    Mapping(_L + "self_attention.linear_qkv.weight",
            tuple(_H + f"self_attn.{p}_proj.weight" for p in "qkv"), "qkv"),
    Mapping(_L + "self_attention.linear_qkv.bias",
            tuple(_H + f"self_attn.{p}_proj.bias" for p in "qkv"), "qkv"),
    Mapping(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",)),
    Mapping(_L + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",)),
    Mapping(_L + "mlp.linear_fc1.weight",
            (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"), "gate_up"),
    Mapping(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",)),
)

# HF tensors that carry no weights of their own (older exports saved RoPE buffers).
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def expand(cfg: ModelConfig) -> list[Mapping]:
    """The concrete table for one architecture (layer indices filled in)."""
    out = [m for m in GLOBAL_MAPPINGS if m.tied in (None, cfg.tie_word_embeddings)]
    for i in range(cfg.num_layers):
        for m in LAYER_MAPPINGS:
            out.append(Mapping(m.mcore.format(i=i), tuple(h.format(i=i) for h in m.hf),
                               m.transform, m.tied))
    return out


def to_mcore(transform: str, hf: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """Build one Megatron parameter from its HF tensors."""
    if transform == "copy":
        return hf[0]
    if transform == "gate_up":
        return torch.cat(hf, dim=0)
    if transform == "vocab":
        (t,) = hf
        pad = cfg.padded_vocab_size - t.shape[0]
        return torch.cat([t, t.new_zeros((pad, *t.shape[1:]))]) if pad else t
    if transform == "qkv":
        q, k, v = hf
        g, d = cfg.num_query_groups, cfg.kv_channels
        rest = q.shape[1:]
        q = q.reshape(g, -1, *rest)  # [g, heads_per_group * d, ...]
        k = k.reshape(g, d, *rest)
        v = v.reshape(g, d, *rest)
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)
    raise ValueError(f"unknown transform {transform!r}")


def to_hf(transform: str, t: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """Split one Megatron parameter into its HF tensors (inverse of :func:`to_mcore`)."""
    if transform == "copy":
        return [t]
    if transform == "gate_up":
        return list(torch.chunk(t, 2, dim=0))
    if transform == "vocab":
        return [t[: cfg.vocab_size]]
    if transform == "qkv":
        g, d = cfg.num_query_groups, cfg.kv_channels
        per_group_q = cfg.num_attention_heads // g * d
        rest = t.shape[1:]
        grouped = t.reshape(g, per_group_q + 2 * d, *rest)
        q, k, v = torch.split(grouped, [per_group_q, d, d], dim=1)
        return [x.reshape(-1, *rest) for x in (q, k, v)]
    raise ValueError(f"unknown transform {transform!r}")
