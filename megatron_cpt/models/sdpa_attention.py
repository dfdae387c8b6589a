"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

Megatron-core's local ``DotProductAttention`` materializes the full ``[b, heads, s, s]``
score matrix and repeats K/V for GQA. Without Transformer Engine that is the slowest and
most memory-hungry part of a layer at sequence length 4096. This drop-in replacement keeps
the same constructor, the same (empty) checkpoint keys and the same input/output layout,
and lets PyTorch pick a fused kernel (flash / memory-efficient on GPU). GQA is passed as
``enable_gqa`` so K/V are not repeated in memory where the kernel supports it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    """``DotProductAttention`` with the same interface, computed by SDPA."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, **kwargs):
        super().__init__(config, layer_number, attn_mask_type, attention_type, **kwargs)
        if config.softmax_type != "vanilla" or config.window_size is not None:
            raise NotImplementedError("SDPAttention supports vanilla softmax without windows; "
                                      "use model.attention_backend=local")
        # DotProductAttention divides its scale by the layer number when
        # apply_query_key_layer_scaling is on and multiplies it back inside the softmax.
        self.sdpa_scale = self.softmax_scale * (
            self.layer_number if config.apply_query_key_layer_scaling else 1)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        """query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]`` -> ``[sq, b, np * hn]``."""
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention supports neither packed sequences nor "
                                      "attention bias; use model.attention_backend=te")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
        is_causal = mask_type == AttnMaskType.causal and attention_mask is None
        # Megatron masks are True where attention is *forbidden*; SDPA's are the opposite.
        mask = None if attention_mask is None else ~attention_mask
        gqa = self.num_attention_heads_per_partition != self.num_query_groups_per_partition
        dropout = self.attention_dropout.p if self.training else 0.0
        if dropout and not self.config.sequence_parallel:
            from megatron.core import tensor_parallel

            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = self._sdpa(q, k, v, mask, dropout, is_causal, gqa)
        else:
            out = self._sdpa(q, k, v, mask, dropout, is_causal, gqa)
        sq, b = out.shape[2], out.shape[0]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    def _sdpa(self, q, k, v, mask, dropout, is_causal, gqa) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                              is_causal=is_causal, scale=self.sdpa_scale,
                                              enable_gqa=gqa)
