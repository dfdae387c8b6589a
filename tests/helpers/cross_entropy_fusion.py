"""Loss and logits gradient of megatron-core's native fused cross-entropy vs the unfused
vocab-parallel one, on CPU in one gloo process; prints a JSON line of both."""
import json
import os

import torch
import torch.distributed as dist


def _run(fn, logits, labels):
    x = logits.clone().requires_grad_()  # both implementations modify their input in place
    loss = fn(x, labels)
    loss.sum().backward()
    return loss.detach(), x.grad


def main() -> None:
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:"
                            + os.environ["PORT"])
    ps.initialize_model_parallel(1, 1)
    torch.manual_seed(0)
    logits, labels = torch.randn(16, 2, 512) * 3, torch.randint(0, 512, (16, 2))
    tp = ps.get_tensor_model_parallel_group()
    fused = _run(lambda x, y: fused_vocab_parallel_cross_entropy(x, y, tp), logits, labels)
    plain = _run(tensor_parallel.vocab_parallel_cross_entropy, logits, labels)
    print(json.dumps({"loss_fused": fused[0].tolist(), "loss_plain": plain[0].tolist(),
                      "grad_fused": fused[1].float().flatten().tolist(),
                      "grad_plain": plain[1].flatten().tolist(),
                      "grad_dtype": str(fused[1].dtype)}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
