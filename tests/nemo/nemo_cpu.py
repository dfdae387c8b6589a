"""Small patches that let NeMo 2.7.3 import/export checkpoints on a CPU-only machine without
Transformer Engine. Imported by the scripts in this folder (run inside .venv-nemo only).

Patches 1-5 redirect CUDA-only calls and apply only without CUDA; patches 6-7 apply only
without Transformer Engine. None of them touches NeMo's conversion logic.
"""
import functools
import importlib.util

import torch


def apply() -> None:
    if not torch.cuda.is_available():
        _cpu_patches()
    if importlib.util.find_spec("transformer_engine") is None:
        _local_spec_patches()


def _cpu_patches() -> None:
    from nemo.lightning.pytorch.strategies import megatron_strategy

    # 1. NeMo saves dist checkpoints asynchronously by default; the async writer calls
    #    torch.cuda.synchronize() (megatron/core/dist_checkpointing/strategies/filesystem_async.py).
    init = megatron_strategy.MegatronStrategy.__init__

    @functools.wraps(init)
    def sync_init(self, *args, **kwargs):
        kwargs["ckpt_async_save"] = False
        init(self, *args, **kwargs)

    megatron_strategy.MegatronStrategy.__init__ = sync_init
    # 2. Without CUDA, synchronize is meaningless.
    torch.cuda.synchronize = lambda *a, **k: None
    # 3. The dist-checkpoint save finalizer all-reduces a flag on torch.cuda.current_device()
    #    (megatron/core/dist_checkpointing/strategies/state_dict_saver.py): use the CPU.
    torch.cuda.current_device = lambda: "cpu"
    # 4. MegatronParallel.init_model_parallel wraps DDP setup in a side CUDA stream
    #    (nemo/lightning/megatron_parallel.py): run it on the current (CPU) stream.
    import contextlib

    torch.cuda.Stream = lambda *a, **k: None
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    # 5. After loading, NeMo moves CUDA tensors to the current CUDA device and first asserts
    #    that CUDA is initialized (nemo/lightning/io/pl.py, _fix_tensors_device): on CPU there
    #    is nothing to move.
    from nemo.lightning.io import pl as nemo_pl

    nemo_pl._fix_tensors_device = lambda ckpt: ckpt


def _local_spec_patches() -> None:
    # 6. Without Transformer Engine NeMo builds the local layer spec, whose modules name the
    #    norms `input_layernorm` / `pre_mlp_layernorm`; NeMo's Qwen2 state mappings use the TE
    #    names (fused into linear_qkv / linear_fc1) and would fail or silently skip the norms.
    #    (The dist checkpoint itself stores the TE names in both cases.)
    from nemo.lightning import io as nemo_io

    te_to_local = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
                   "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}
    apply_transforms = nemo_io.apply_transforms

    def _module(m):
        return getattr(m, "module", m)

    @functools.wraps(apply_transforms)
    def local_norm_names(source, target, mapping, *args, **kwargs):
        names = set(_module(source).state_dict()) | set(_module(target).state_dict())
        if not any(".layer_norm_weight" in n for n in names):
            renamed = {}
            for src, tgt in mapping.items():
                for te, local in te_to_local.items():
                    src, tgt = src.replace(te, local), tgt.replace(te, local)
                renamed[src] = tgt
            mapping = renamed
        return apply_transforms(source, target, mapping, *args, **kwargs)

    nemo_io.apply_transforms = local_norm_names
    # 7. Without TE, the local spec's norms (torch RMSNorm) are created in float32 whatever
    #    params_dtype is, and nothing casts them on CPU (on GPU, TE creates them in params_dtype);
    #    NeMo's HF exporter then refuses the float32 norms of a bfloat16 model. Cast the loaded
    #    model to its declared params_dtype (the checkpoint stores every tensor in that dtype,
    #    so this is exact).
    from nemo.lightning.io.connector import ModelConnector

    nemo_load = ModelConnector.nemo_load

    @functools.wraps(nemo_load)
    def nemo_load_in_params_dtype(self, *args, **kwargs):
        model, trainer = nemo_load(self, *args, **kwargs)
        dtype = model.config.params_dtype
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        return model, trainer

    ModelConnector.nemo_load = nemo_load_in_params_dtype
