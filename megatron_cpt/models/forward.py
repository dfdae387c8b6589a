"""Forward-only passes through a (tensor- and pipeline-) parallel GPTModel."""
from __future__ import annotations

import torch


def forward_logits(model, tokens: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor | None:
    """Full-vocabulary logits ``[batch, seq, vocab]`` for ``tokens`` on the last pipeline
    stage (``None`` on other stages). TP shards are gathered; padded vocabulary rows are
    cut to ``vocab_size`` when given. All ranks of the model-parallel group must call it.
    """
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, seq = tokens.shape
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    position_ids = torch.arange(seq, device=device).unsqueeze(0).expand(batch, seq)
    collected: list[torch.Tensor] = []

    def forward_step(data_iterator, gpt):
        output = gpt(tokens, position_ids, None)

        def keep(output_tensor):
            collected.append(output_tensor.detach())
            return output_tensor.new_zeros(()), {}

        return output, keep

    with torch.no_grad():
        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            collected.append(model(tokens, position_ids, None).detach())
        else:
            get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=None,
                model=[model],
                num_microbatches=1,
                seq_length=seq,
                micro_batch_size=batch,
                forward_only=True,
            )
    if not parallel_state.is_pipeline_last_stage():
        return None
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(collected[0])
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    return logits.float()
