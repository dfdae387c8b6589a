"""Qwen2.5 architectures as Megatron-core GPT models.

A :class:`ModelConfig` holds the architecture (what ``config.json`` of a Hugging Face
Qwen2 model holds) and nothing about parallelism or precision; :func:`build_gpt_model`
turns it into a Megatron ``GPTModel`` for one pipeline stage.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from megatron_cpt.config_loader import YamlDoc, build, read_yaml
from megatron_cpt.config_ranges import ranged
from megatron_cpt.errors import UsageError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"
HF_ARCHITECTURES = ("Qwen2ForCausalLM",)


@dataclass(frozen=True)
class ModelConfig:
    """A Qwen2-family decoder. Field names follow Megatron's ``TransformerConfig``."""

    name: str
    num_layers: int = ranged(lo=1)
    hidden_size: int = ranged(lo=1)
    num_attention_heads: int = ranged(lo=1)
    num_query_groups: int = ranged(lo=1)
    ffn_hidden_size: int = ranged(lo=1)
    vocab_size: int = ranged(lo=1)  # rows of the HF embedding (config.json vocab_size), not the tokenizer size
    tie_word_embeddings: bool
    max_position_embeddings: int = ranged(32768, 1)
    rotary_base: float = ranged(1_000_000.0, 0, lo_open=True)
    norm_eps: float = ranged(1e-6, 0, lo_open=True)
    # Megatron pads embedding rows to a multiple of this; Qwen2.5's HF rows already are,
    # so the padded size equals the HF row count (never derive it from the tokenizer size).
    make_vocab_size_divisible_by: int = ranged(128, 1)

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // m) * m

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameter count of the HF model (unpadded vocabulary)."""
        h, f, d = self.hidden_size, self.ffn_hidden_size, self.kv_channels
        q, kv = self.num_attention_heads * d, self.num_query_groups * d
        attn = h * (q + 2 * kv) + (q + 2 * kv) + q * h
        layer = attn + 3 * h * f + 2 * h
        n = self.num_layers * layer + h
        if include_embeddings:
            n += self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return n

    def check_parallel(self, tp: int, pp: int) -> None:
        """Raise UsageError when TP/PP cannot split this architecture."""
        if tp < 1 or pp < 1:
            raise UsageError(f"TP and PP must be >= 1 (got TP={tp}, PP={pp})")
        if self.num_attention_heads % tp:
            raise UsageError(f"TP={tp} does not divide {self.name}'s {self.num_attention_heads} "
                             "attention heads; choose a TP that divides it")
        if self.num_query_groups % tp:
            raise UsageError(f"TP={tp} does not divide {self.name}'s {self.num_query_groups} kv "
                             "heads (query groups); choose a TP that divides it")
        if self.num_layers % pp:
            raise UsageError(f"PP={pp} does not divide {self.name}'s {self.num_layers} layers; "
                             "choose a PP that divides it")
        if self.padded_vocab_size % tp:
            raise UsageError(f"TP={tp} does not divide the {self.padded_vocab_size} embedding "
                             "rows; raise make_vocab_size_divisible_by")

    # -- serialization --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], doc: YamlDoc | None = None) -> "ModelConfig":
        return build(cls, data, doc)

    @classmethod
    def load(cls, name_or_path: str | Path, retired: tuple[str, ...] = ()) -> "ModelConfig":
        """Load ``configs/models/<name>.yaml`` or a YAML path; keys in ``retired`` (written
        by older versions, no longer meaningful) are dropped instead of refused."""
        path = Path(name_or_path)
        if path.suffix not in (".yaml", ".yml"):  # a name like "qwen2.5-7b", not a file
            path = CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
            raise UsageError(f"model config {name_or_path!r} not found; known: {known}")
        doc = read_yaml(path, "model config")
        if isinstance(doc.data, dict):
            for key in retired:
                doc.data.pop(key, None)
        return cls.from_dict(doc.data, doc)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], name: str = "hf") -> "ModelConfig":
        """Read a Hugging Face ``config.json`` dict; refuse anything that is not Qwen2."""
        archs = cfg.get("architectures") or []
        if not any(a in HF_ARCHITECTURES for a in archs):
            raise UsageError(f"unsupported architectures {archs} in config.json; "
                             f"supported: {list(HF_ARCHITECTURES)} (Qwen2 / Qwen2.5)")
        if cfg.get("hidden_act", "silu") != "silu":
            raise UsageError(f"unsupported hidden_act {cfg['hidden_act']!r}; Qwen2 uses silu")
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        if head_dim * heads != cfg["hidden_size"]:
            raise UsageError("head_dim * num_attention_heads != hidden_size is not supported")
        rope = cfg.get("rope_theta")
        if rope is None:
            rope = (cfg.get("rope_parameters") or {}).get("rope_theta", 1_000_000.0)
        return cls(
            name=name,
            num_layers=cfg["num_hidden_layers"],
            hidden_size=cfg["hidden_size"],
            num_attention_heads=heads,
            num_query_groups=cfg.get("num_key_value_heads", heads),
            ffn_hidden_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            rotary_base=float(rope),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        )

    def to_hf_config(self, torch_dtype: str = "bfloat16") -> dict[str, Any]:
        """The ``config.json`` of the equivalent ``Qwen2ForCausalLM``."""
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_query_groups,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rotary_base,
            "rms_norm_eps": self.norm_eps,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            # Qwen2.5 base: <|endoftext|> is both BOS and EOD (tiny test vocabularies lack it)
            "bos_token_id": 151643 if self.vocab_size > 151643 else None,
            "eos_token_id": 151643 if self.vocab_size > 151643 else None,
            "initializer_range": 0.02,
            "torch_dtype": torch_dtype,
        }


def transformer_engine_available() -> bool:
    """True when Transformer Engine's PyTorch extension is importable."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # a broken TE install falls back to the local spec
        return False
    return True


@dataclass(frozen=True)
class BuildOptions:
    """How to instantiate (not what): parallelism, precision, kernels."""

    tp: int = 1
    pp: int = 1
    params_dtype: torch.dtype = torch.float32
    use_te: bool | None = None  # None: TE when it imports
    # core attention: "te" (TE spec), "sdpa" (local spec + torch SDPA), "local" (Megatron's
    # unfused local attention); None: te when TE imports, else sdpa
    attention_backend: str | None = None
    sequence_parallel: bool = False
    init_weights: bool = True  # False when a checkpoint will overwrite every weight
    init_method_std: float = 0.02
    # models/fusions.py: what the config asks for (TrainConfig.model or a FusionRequest; None:
    # all auto) and what this machine offers (None: detected); tests inject a GPU's answer
    fusion_request: Any = None
    kernel_probe: Any = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # TransformerConfig extras


def fusion_fields(opts: BuildOptions) -> dict[str, Any]:
    """The ``TransformerConfig`` fusion fields for ``opts`` (models/fusions.py decides)."""
    from megatron_cpt.models import fusions

    dtype = "bfloat16" if opts.params_dtype == torch.bfloat16 else "float32"
    resolved = fusions.resolve(opts.fusion_request or fusions.AUTO, dtype, opts.kernel_probe,
                               resolve_attention_backend(opts))
    return fusions.transformer_config_fields(resolved)


def transformer_config(model: ModelConfig, opts: BuildOptions):
    """Megatron ``TransformerConfig`` for ``model`` under ``opts``."""
    from megatron.core.transformer import TransformerConfig

    half = opts.params_dtype in (torch.bfloat16, torch.float16)
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        add_bias_linear=False,
        add_qkv_bias=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=opts.init_method_std,
        tensor_model_parallel_size=opts.tp,
        pipeline_model_parallel_size=opts.pp,
        sequence_parallel=opts.sequence_parallel and opts.tp > 1,
        params_dtype=opts.params_dtype,
        pipeline_dtype=opts.params_dtype,
        bf16=opts.params_dtype == torch.bfloat16,
        fp16=opts.params_dtype == torch.float16,
        autocast_dtype=opts.params_dtype if half else None,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=opts.init_weights,
        **{**fusion_fields(opts), **opts.extra},
    )


ATTENTION_BACKENDS = ("te", "sdpa", "local")


def resolve_attention_backend(opts: "BuildOptions") -> str:
    """The backend ``opts`` asks for, checked against what is installed."""
    te = transformer_engine_available() if opts.use_te is None else opts.use_te
    backend = opts.attention_backend or ("te" if te else "sdpa")
    if backend not in ATTENTION_BACKENDS:
        raise UsageError(f"unknown model.attention_backend {backend!r}; choose one of "
                         f"{list(ATTENTION_BACKENDS)}")
    if backend == "te" and not transformer_engine_available():
        raise UsageError("model.attention_backend=te needs Transformer Engine; install the gpu "
                         "extra (pip install -e '.[gpu]') or use attention_backend=sdpa")
    return backend


def layer_spec(attention_backend: str):
    """TE spec (fused norms + FP8-capable linears) or the local spec with SDPA or
    Megatron's local core attention.

    All save the same dist-checkpoint keys: the local spec maps ``input_layernorm.`` to
    ``self_attention.linear_qkv.layer_norm_`` through ``sharded_state_dict_keys_map``.
    """
    import copy

    from megatron.core.models.gpt import gpt_layer_specs as specs

    if attention_backend == "te":
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=False)
    spec = specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    if attention_backend == "sdpa":
        from megatron_cpt.models.sdpa_attention import SDPAttention

        spec = copy.deepcopy(spec)
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def build_gpt_model(model: ModelConfig, opts: BuildOptions):
    """A ``GPTModel`` for this rank's pipeline stage (model-parallel groups must exist)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(model, opts)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(resolve_attention_backend(opts)),
        vocab_size=model.padded_vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(model.rotary_base),
    )
    cast_to_training_dtype(gpt, opts.params_dtype)
    if torch.cuda.is_available():
        gpt.cuda(torch.cuda.current_device())
    return gpt


def cast_to_training_dtype(gpt, dtype: torch.dtype) -> None:
    """Put every parameter in ``dtype``, as Megatron-LM's ``Float16Module`` does.

    megatron-core 0.16.1's local spec builds RMSNorm as ``WrappedTorchNorm``, which creates its
    weight without a dtype (fp32) beside ``params_dtype=bf16`` linears. A mixed-dtype model makes
    DDP keep one buffer per dtype, and the optimizers then list their fp32 main parameters in an
    order that differs from the model's: checkpoint state is paired with the wrong parameters
    (an assertion where sizes differ, silent where they coincide). The fp32 master weights
    stay with the optimizer (``OptimizerConfig.bf16``), as in Megatron-LM."""
    stragglers = [p for p in gpt.parameters() if p.dtype != dtype]
    if stragglers:
        gpt.to(dtype=dtype)
