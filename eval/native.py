"""An lm-eval model (``megatron_cpt``) that scores a Megatron checkpoint in place, at any
TP/PP, so intermediate checkpoints need no export.

Run it under torchrun with TP*PP processes; every rank sees all requests (lm-eval is told
rank 0 of 1) and the last pipeline stage's log-likelihoods are broadcast to all ranks.
Tokenization and truncation follow lm-eval's ``hf`` backend, so per-request
log-likelihoods agree with ``lm_eval --model hf`` on the exported checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm


def span_scores(logprobs: torch.Tensor, spans) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row ``i`` of ``logprobs`` ``[batch, seq, vocab]`` and its span ``(first, tokens)``:
    the continuation's summed log-likelihood and whether every token is the argmax. Computed
    on ``logprobs``' device (the token ids are put there), read by the caller in one copy."""
    ll, greedy = [], []
    for i, (first, cont) in enumerate(spans):
        lp = logprobs[i, first: first + len(cont)]
        target = torch.tensor(cont, dtype=torch.long, device=logprobs.device)
        ll.append(lp.gather(-1, target.unsqueeze(-1)).sum())
        greedy.append((lp.argmax(-1) == target).all())
    return torch.stack(ll), torch.stack(greedy)


@register_model("megatron_cpt")
class MegatronCPTLM(TemplateLM):
    """``--model megatron_cpt --model_args ckpt=DIR,tp=1,pp=1,batch_size=16``."""

    def __init__(self, ckpt: str, tp: int = 1, pp: int = 1, batch_size: int = 16,
                 dtype: str = "float32", tokenizer: str | None = None, **_: object):
        super().__init__()
        from transformers import AutoTokenizer

        from megatron_cpt.checkpoint import store

        self.ckpt = Path(ckpt)
        self.model, self.model_cfg = store.load_model(self.ckpt, int(tp), int(pp), dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer or self.ckpt / store.TOKENIZER))
        self.batch_size_per_gpu = int(batch_size)
        self.max_length = self.model_cfg.max_position_embeddings
        # (context, continuation) -> continuation tokens, for per-token normalisation (CF)
        self.continuation_tokens: dict[tuple[str, str], int] = {}

    # lm-eval sees one process: TP/PP ranks all handle every request.
    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        extra = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **extra)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        # Longest first (like the hf backend) so batches pad little; results in input order.
        order = sorted(range(len(requests)),
                       key=lambda i: -len(requests[i][1] + requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for pair, _, continuation_enc in requests:
            self.continuation_tokens[tuple(pair)] = len(continuation_enc)
        bar = tqdm(total=len(requests), desc="megatron_cpt loglikelihood",
                   disable=disable_tqdm or torch.distributed.get_rank() != 0)
        for start in range(0, len(order), self.batch_size_per_gpu):
            chunk = order[start:start + self.batch_size_per_gpu]
            scored = self._score_batch([requests[i] for i in chunk])
            for i, r in zip(chunk, scored):
                results[i] = r
            bar.update(len(chunk))
        bar.close()
        return results

    def _score_batch(self, batch) -> list[tuple[float, bool]]:
        from megatron.core import parallel_state

        from megatron_cpt.models.forward import forward_logits

        rows, spans = [], []
        for _, context_enc, continuation_enc in batch:
            # hf backend: keep the last max_length+1 tokens, drop the last as input
            whole = (context_enc + continuation_enc)[-(self.max_length + 1):]
            inp = whole[:-1]
            rows.append(inp)
            spans.append((len(inp) - len(continuation_enc), continuation_enc))
        width = max(len(r) for r in rows)
        tokens = torch.full((len(rows), width), self.eot_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r)
        logits = forward_logits(self.model, tokens, vocab_size=self.model_cfg.vocab_size)
        out: list = [None]
        if logits is not None:
            ll, greedy = span_scores(F.log_softmax(logits.float(), dim=-1), spans)  # as hf
            out[0] = list(zip(ll.tolist(), greedy.tolist()))
        # objects travel as bytes on the device torch picks for the group's backend
        torch.distributed.broadcast_object_list(
            out, src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group())
        return out[0]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("megatron_cpt scores multiple-choice exams (loglikelihood only)")

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("megatron_cpt does not generate text")
