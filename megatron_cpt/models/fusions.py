"""Which fused kernels a run uses, decided once from the config and what this machine offers.

Each fusion is on where its kernel exists and the result is unchanged, can be turned off in
the config (``model.*_fusion``), and is refused with one line (exit 2) when the config asks
for it and the kernel is missing — never silently dropped. The availability facts live in a
:class:`KernelProbe` so tests can inject "Transformer Engine present" on a CPU machine.

Facts about megatron-core 0.16.1 behind the rules:
  * gradient-accumulation fusion: GPTModel's output layer is always megatron-core's own
    ``ColumnParallelLinear``, which raises without APEX's ``fused_weight_gradient_mlp_cuda``
    (tensor_parallel/layers.py:924) even under the TE layer spec, so TE alone is not enough.
  * RoPE fusion: TE's ``fused_apply_rotary_pos_emb`` (transformer_config.py:1549 refuses otherwise).
  * cross-entropy fusion: ``te`` needs TE; ``native`` (fusions/fused_cross_entropy.py) runs
    anywhere torch.compile does, but returns the logits gradient in bf16 (line 82): the same
    result in a bf16 run, a rounded one in an fp32 run, so "auto" only picks it for bf16.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

from megatron_cpt.errors import UsageError

CROSS_ENTROPY_CHOICES = ("native", "te", "off")


@dataclass(frozen=True)
class KernelProbe:
    """What this process can run: CUDA, Transformer Engine (and why not), APEX's wgrad kernel."""

    cuda: bool
    te: bool
    te_why: str
    apex_wgrad: bool

    @classmethod
    def detect(cls) -> "KernelProbe":
        import torch

        cuda = torch.cuda.is_available()
        te, te_why = _te_status()
        apex = cuda and _imports("fused_weight_gradient_mlp_cuda")
        return cls(cuda=cuda, te=cuda and te, te_why=te_why if cuda else
                   "no CUDA device: Transformer Engine is CUDA-only", apex_wgrad=apex)


def _imports(module: str) -> bool:
    if importlib.util.find_spec(module) is None:
        return False
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True


def _te_status() -> tuple[bool, str]:
    """(usable, why) for Transformer Engine's PyTorch extension; a broken install says why."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False, "transformer_engine is not installed (pip install -e '.[gpu]')"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # installed but broken (CUDA/cuDNN/torch mismatch)
        first = (str(exc).splitlines() or [""])[0][:200]
        return False, f"transformer_engine fails to import: {type(exc).__name__}: {first}"
    return True, "transformer_engine.pytorch imports"


@dataclass(frozen=True)
class Fusion:
    on: bool
    why: str
    impl: str | None = None  # cross-entropy only: native | te


def _switch(name: str, asked: bool | None, available: bool, missing: str, yes: str) -> Fusion:
    if asked is False:
        return Fusion(False, f"model.{name}=false")
    if available:
        return Fusion(True, yes)
    if asked:
        raise UsageError(f"model.{name}=true but {missing}; set model.{name}=null (auto) or false")
    return Fusion(False, missing)


def _cross_entropy(asked: str | None, dtype: str, probe: KernelProbe) -> Fusion:
    if asked is not None and asked not in CROSS_ENTROPY_CHOICES:
        raise UsageError(f"model.cross_entropy_fusion {asked!r} unknown; choose null (auto), "
                         "native, te or off")
    if asked == "off":
        return Fusion(False, "model.cross_entropy_fusion=off")
    if asked == "te":
        if not probe.te:
            raise UsageError(f"model.cross_entropy_fusion=te needs Transformer Engine ({probe.te_why}); "
                             "use native, off or null (auto)")
        return Fusion(True, "model.cross_entropy_fusion=te", "te")
    if asked == "native":
        why = "model.cross_entropy_fusion=native"
        if dtype != "bfloat16":
            why += " (its logits gradient is bf16: rounded in this float32 run)"
        return Fusion(True, why, "native")
    if dtype != "bfloat16":
        return Fusion(False, "float32 run: megatron-core's fused cross-entropy returns a bf16 "
                             "logits gradient; set model.cross_entropy_fusion=native to use it anyway")
    if probe.te:
        return Fusion(True, "bf16 run with Transformer Engine: TE's parallel cross-entropy", "te")
    return Fusion(True, "bf16 run: megatron-core's native fused cross-entropy", "native")


def resolve(model_section, dtype: str, probe: KernelProbe | None = None) -> dict[str, Fusion]:
    """The fusions this run uses, each with the reason; UsageError for an impossible request."""
    p = probe or KernelProbe.detect()
    no_apex = ("APEX's fused_weight_gradient_mlp_cuda is missing (megatron-core 0.16.1's output "
               "layer needs it even with Transformer Engine)") if p.cuda else "no CUDA device"
    return {
        "gradient_accumulation_fusion": _switch(
            "gradient_accumulation_fusion", model_section.gradient_accumulation_fusion,
            p.cuda and p.apex_wgrad, no_apex, "APEX wgrad kernel accumulates into main_grad"),
        "rope_fusion": _switch(
            "rope_fusion", model_section.rope_fusion, p.te,
            f"needs Transformer Engine ({p.te_why})", "Transformer Engine's fused RoPE"),
        "cross_entropy_fusion": _cross_entropy(model_section.cross_entropy_fusion, dtype, p),
    }


def transformer_config_fields(fusions: dict[str, Fusion]) -> dict:
    """The ``TransformerConfig`` fields for the resolved fusions."""
    ce = fusions["cross_entropy_fusion"]
    fields = {"gradient_accumulation_fusion": fusions["gradient_accumulation_fusion"].on,
              "apply_rope_fusion": fusions["rope_fusion"].on,
              "cross_entropy_loss_fusion": ce.on}
    if ce.on:
        fields["cross_entropy_fusion_impl"] = ce.impl
    return fields
