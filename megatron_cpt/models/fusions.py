"""Which fused kernels and GPU-only options a model uses: one pure function, :func:`resolve`,
of the request (``model.*_fusion``), the dtype, the attention backend (which decides the
layer spec) and what this machine can import (:class:`KernelProbe`).

Every ``TransformerConfig`` fusion field is set from here, by the trainer and by every other
model build (conversion, evaluation, benchmarks), so no flag is ever on without its kernel:
a flag whose kernel is missing would assert at model build or fail at the first forward, as
``persist_layer_norm`` and ``masked_softmax_fusion`` did on the first GPU run when they were
set from "CUDA is present". Each fusion is on where its kernel exists and the result is
unchanged, can be turned off in the config, and is refused with one line (exit 2) when the
config asks for it and the kernel is missing — never silently dropped. Tests inject probes for
"CUDA without TE/Apex", "CUDA with TE" and "CPU" and build the model with each answer on CPU.

Facts about megatron-core 0.16.1 behind the rules:
  * gradient-accumulation fusion: GPTModel's output layer is always megatron-core's own
    ``ColumnParallelLinear``, which raises without APEX's ``fused_weight_gradient_mlp_cuda``
    (tensor_parallel/layers.py:924) even under the TE layer spec, so TE alone is not enough.
  * RoPE fusion: TE's ``fused_apply_rotary_pos_emb`` (transformer_config.py:1549 refuses otherwise).
  * cross-entropy fusion: ``te`` needs TE; ``native`` (fusions/fused_cross_entropy.py) runs
    anywhere torch.compile does, but returns the logits gradient in bf16 (line 82): the same
    result in a bf16 run, a rounded one in an fp32 run, so "auto" only picks it for bf16.
  * bias-activation (SwiGLU) and bias-dropout-add fusions: pure PyTorch under
    ``megatron.core.jit.jit_fuser`` (``torch.compile``); on CUDA that needs Triton. On CPU
    they would compile C++ per shape for no gain, so "auto" keeps them for CUDA.
  * masked-softmax fusion: only Megatron's local core attention (``attention_backend: local``)
    uses it, and it imports Megatron-LM's compiled ``scaled_masked_softmax_cuda`` /
    ``scaled_upper_triang_masked_softmax_cuda``, which a pip install of megatron-core lacks.
  * persistent / memory-efficient LayerNorm: APEX's fused *LayerNorm* kernels; Qwen2 uses
    RMSNorm, and the local spec's ``WrappedTorchNorm`` asserts on ``persist_layer_norm``:
    always off (TE's RMSNorm has no such switch).
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
    triton: bool = False            # torch.compile's CUDA backend (the jit_fuser fusions)
    megatron_softmax: bool = False  # Megatron-LM's compiled scaled_*masked_softmax_cuda

    @classmethod
    def detect(cls) -> "KernelProbe":
        import torch

        cuda = torch.cuda.is_available()
        te, te_why = _te_status()
        apex = cuda and _imports("fused_weight_gradient_mlp_cuda")
        softmax = cuda and all(_imports(m) for m in SOFTMAX_KERNELS)
        return cls(cuda=cuda, te=cuda and te, te_why=te_why if cuda else
                   "no CUDA device: Transformer Engine is CUDA-only", apex_wgrad=apex,
                   triton=cuda and importlib.util.find_spec("triton") is not None,
                   megatron_softmax=softmax)


SOFTMAX_KERNELS = ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda")


@dataclass(frozen=True)
class FusionRequest:
    """What a config asks for (``TrainConfig.model`` has the same fields); all auto here."""

    gradient_accumulation_fusion: bool | None = None
    rope_fusion: bool | None = None
    cross_entropy_fusion: str | None = None
    bias_activation_fusion: bool | None = None
    bias_dropout_fusion: bool | None = None
    masked_softmax_fusion: bool | None = None


AUTO = FusionRequest()


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


def _masked_softmax(asked: bool | None, backend: str, probe: KernelProbe) -> Fusion:
    if backend != "local":
        if asked:
            raise UsageError(f"model.masked_softmax_fusion=true but attention_backend={backend} "
                             "does not use Megatron's softmax; use attention_backend=local or null")
        return Fusion(False, f"unused: attention_backend={backend} computes its own softmax")
    missing = ("needs CUDA" if not probe.cuda else
               f"Megatron-LM's compiled {' / '.join(SOFTMAX_KERNELS)} are not installed")
    return _switch("masked_softmax_fusion", asked, probe.megatron_softmax, missing,
                   "Megatron-LM's compiled masked-softmax kernels import")


def _jit_fused(name: str, asked: bool | None, probe: KernelProbe, what: str) -> Fusion:
    missing = ("CPU: torch.compile would build C++ kernels per shape for no gain" if not probe.cuda
               else "Triton is missing: torch.compile cannot fuse on CUDA")
    return _switch(name, asked, probe.cuda and probe.triton, missing,
                   f"{what} fused by torch.compile (Triton)")


def resolve(request=AUTO, dtype: str = "float32", probe: KernelProbe | None = None,
            attention_backend: str = "sdpa") -> dict[str, Fusion]:
    """The fusions a model uses, each with the reason; UsageError for an impossible request.

    ``request``: ``TrainConfig.model`` or a :class:`FusionRequest`; ``attention_backend``:
    te | sdpa | local, as resolved (it decides the layer spec)."""
    p = probe or KernelProbe.detect()
    no_apex = ("APEX's fused_weight_gradient_mlp_cuda is missing (megatron-core 0.16.1's output "
               "layer needs it even with Transformer Engine)") if p.cuda else "no CUDA device"
    spec = "TE spec" if attention_backend == "te" else "local spec"
    return {
        "gradient_accumulation_fusion": _switch(
            "gradient_accumulation_fusion", request.gradient_accumulation_fusion,
            p.cuda and p.apex_wgrad, no_apex, "APEX wgrad kernel accumulates into main_grad"),
        "rope_fusion": _switch(
            "rope_fusion", request.rope_fusion, p.te,
            f"needs Transformer Engine ({p.te_why})", "Transformer Engine's fused RoPE"),
        "cross_entropy_fusion": _cross_entropy(request.cross_entropy_fusion, dtype, p),
        "bias_activation_fusion": _jit_fused("bias_activation_fusion",
                                             request.bias_activation_fusion, p, "SwiGLU"),
        "bias_dropout_fusion": _jit_fused("bias_dropout_fusion", request.bias_dropout_fusion, p,
                                          "bias-dropout-add"),
        "masked_softmax_fusion": _masked_softmax(request.masked_softmax_fusion,
                                                 attention_backend, p),
        "persist_layer_norm": Fusion(False, f"{spec}: APEX's persistent kernel is LayerNorm-only "
                                            "and Qwen2 uses RMSNorm (WrappedTorchNorm asserts on it)"),
    }


def transformer_config_fields(fusions: dict[str, Fusion]) -> dict:
    """The ``TransformerConfig`` fields for the resolved fusions."""
    ce = fusions["cross_entropy_fusion"]
    fields = {"gradient_accumulation_fusion": fusions["gradient_accumulation_fusion"].on,
              "apply_rope_fusion": fusions["rope_fusion"].on,
              "cross_entropy_loss_fusion": ce.on,
              "bias_activation_fusion": fusions["bias_activation_fusion"].on,
              "bias_dropout_fusion": fusions["bias_dropout_fusion"].on,
              "masked_softmax_fusion": fusions["masked_softmax_fusion"].on,
              "persist_layer_norm": fusions["persist_layer_norm"].on,
              "memory_efficient_layer_norm": False}  # APEX LayerNorm only, like persist
    if ce.on:
        fields["cross_entropy_fusion_impl"] = ce.impl
    return fields
