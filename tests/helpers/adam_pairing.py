"""Is every parameter paired with its own Adam state in a bf16 run? (issue 24, item 1)

Usage: torchrun --nproc_per_node TP tests/helpers/adam_pairing.py SPEC.json
SPEC: {"phase": "train" | "load", "tp", "toy", "work", "distributed_optimizer", "format"}

phase "train": the trainer's own state (``loop.build_training_state``: bf16 model, Megatron
DDP, the Megatron optimizer) runs 3 steps on fixed random batches; each parameter's reduced
gradient (``main_grad``) is captured and fed to an independent ``torch.optim.AdamW`` on an
fp32 copy: its moments are the reference. The optimizer's own moments of each parameter
(looked up from the model parameter, as a checkpoint does) must equal them; then the state is
saved through the trainer's ``Checkpointer`` and the reference written to WORK/ref_tp<TP>.pt.
phase "load": a fresh state at another TP loads that checkpoint through ``checkpointing.load``
and every parameter's moments must equal the reference's slice for this TP rank.
Prints one JSON line per rank: {"checked": N, "max_rel_err": x}.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

STEPS, SEQ, MICRO = 3, 32, 2


def _config(spec: dict):
    from megatron_cpt.training.config import TrainConfig
    from megatron_cpt.training.toy import toy_overrides

    toy = {"pretrained": Path(spec["toy"]) / "pretrained",
           "prefixes": {n: str(Path(spec["toy"]) / "data" / n) for n in
                        ("legal_train", "general_train", "legal_valid", "general_valid")}}
    root = Path(__file__).resolve().parents[2]
    return TrainConfig.load(root / "configs" / "train" / "tiny-cpu.yaml", [
        *toy_overrides(toy, Path(spec["work"]) / "run"), f"parallel.tp={spec['tp']}",
        "precision.dtype=bfloat16", "optimizer.clip_grad=0.0",  # Adam sees the raw gradients
        f"parallel.distributed_optimizer={str(spec['distributed_optimizer']).lower()}",
        f"checkpoint.optimizer_format={spec['format']}"])


def _moments(optimizer, param) -> tuple[torch.Tensor, torch.Tensor]:
    """The optimizer's (exp_avg, exp_avg_sq) of a model parameter, the way a checkpoint finds them."""
    opt = getattr(optimizer, "chained_optimizers", [optimizer])[0]
    if hasattr(opt, "_get_main_param_and_optimizer_states"):  # DistributedOptimizer (DP1: whole)
        st = opt._get_main_param_and_optimizer_states(param)
        return st["exp_avg"].view(param.shape), st["exp_avg_sq"].view(param.shape)
    for model_group, main_group in zip(opt.float16_groups, opt.fp32_from_float16_groups):
        for model_p, main_p in zip(model_group, main_group):
            if model_p is param:
                st = opt.optimizer.state[main_p]
                return st["exp_avg"], st["exp_avg_sq"]
    raise AssertionError("a model parameter has no fp32 main parameter")


def _shard(name: str, full: torch.Tensor, param, tp: int, rank: int) -> torch.Tensor:
    """This TP rank's part of a TP1 tensor (fc1 is [gate; up], each split over TP)."""
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return full
    dim = param.partition_dim
    if "linear_fc1.weight" in name:
        return torch.cat([half.chunk(tp, dim)[rank] for half in full.chunk(2, dim)], dim)
    return full.chunk(tp, dim)[rank]


def _compare(gpt, optimizer, ref: dict, tp: int) -> dict:
    from megatron.core import parallel_state as ps

    rank, worst, n = ps.get_tensor_model_parallel_rank(), 0.0, 0
    for name, p in gpt.named_parameters():
        got = _moments(optimizer, p)
        for which, g, r in zip(("exp_avg", "exp_avg_sq"), got, ref[name]):
            want = _shard(name, r, p, tp, rank)
            assert g.shape == want.shape, (name, which, g.shape, want.shape)
            err = float((g.float() - want).abs().max() / want.abs().max().clamp_min(1e-30))
            assert err < 1e-5, f"{name} {which}: relative error {err:.3g} vs the reference"
            worst, n = max(worst, err), n + 1
    return {"checked": n, "max_rel_err": worst}


def _train_and_save(spec, cfg, gpt, model, optimizer, scheduler) -> dict:
    from megatron.core.distributed import finalize_model_grads

    from megatron_cpt.training import checkpointing
    from megatron_cpt.training.checkpointing import Checkpointer, Layout, SaveOptions

    o = cfg.optimizer
    ref_params = {n: p.detach().float().clone().requires_grad_() for n, p in gpt.named_parameters()}
    adam = torch.optim.AdamW(ref_params.values(), lr=0.0, betas=(o.adam_beta1, o.adam_beta2),
                             eps=o.adam_eps, weight_decay=0.0)
    gen = torch.Generator().manual_seed(7)
    for _ in range(STEPS):
        tokens = torch.randint(0, 400, (MICRO, SEQ + 1), generator=gen)
        pos = torch.arange(SEQ).unsqueeze(0).expand(MICRO, SEQ)
        model.zero_grad_buffer()
        optimizer.zero_grad()
        model(tokens[:, :-1], pos, None, labels=tokens[:, 1:]).float().mean().backward()
        finalize_model_grads([model])
        for n, p in gpt.named_parameters():
            ref_params[n].grad = p.main_grad.detach().float().clone()
        adam.step()
        optimizer.step()
    ref = {n: (adam.state[q]["exp_avg"], adam.state[q]["exp_avg_sq"]) for n, q in ref_params.items()}
    result = _compare(gpt, optimizer, ref, spec["tp"])
    layout = Layout.of(spec["tp"], 1, 1)
    saver = Checkpointer(SaveOptions(run_dir=Path(spec["work"]) / "run",
                                     pretrained=Path(spec["toy"]) / "pretrained",
                                     keep_last=1, keep_iterations=set()))
    saver.save(STEPS, gpt, optimizer, scheduler, {"layout": layout.to_dict(),
                                                 "optimizer_format": spec["format"],
                                                 "dtype": "bfloat16"})
    if dist.get_rank() == 0:
        assert spec["tp"] == 1, "the reference is written from a TP1 run (whole tensors)"
        torch.save(ref, Path(spec["work"]) / "ref.pt")
    assert checkpointing.latest_checkpoint(Path(spec["work"]) / "run") is not None
    return result


def main() -> None:
    from megatron_cpt.checkpoint import store
    from megatron_cpt.runtime import init_distributed, shutdown
    from megatron_cpt.training import checkpointing
    from megatron_cpt.training.loop import build_training_state

    spec = json.loads(Path(sys.argv[1]).read_text())
    cfg = _config(spec)
    init_distributed(spec["tp"], 1, seed=1234)
    model_cfg = store.read_model_config(Path(spec["toy"]) / "pretrained")
    gpt, model, optimizer, scheduler = build_training_state(
        cfg, model_cfg, torch.bfloat16, 30, torch.device("cpu"))
    assert {p.dtype for p in gpt.parameters()} == {torch.bfloat16}, "a parameter is not bf16"
    if spec["phase"] == "train":
        result = _train_and_save(spec, cfg, gpt, model, optimizer, scheduler)
    else:
        ckpt = checkpointing.latest_checkpoint(Path(spec["work"]) / "run")
        checkpointing.load(ckpt, gpt, optimizer, scheduler, checkpointing.Layout.of(spec["tp"], 1, 1))
        ref = torch.load(Path(spec["work"]) / "ref.pt")
        result = _compare(gpt, optimizer, ref, spec["tp"])
    # a file per rank: two ranks printing at once can share a line of torchrun's captured stdout
    out = Path(spec["work"]) / f"{spec['phase']}.rank{dist.get_rank()}.result.json"
    out.write_text(json.dumps({"rank": dist.get_rank(), **result}))
    shutdown()


if __name__ == "__main__":
    main()
