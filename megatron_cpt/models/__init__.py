"""Qwen2.5 model zoo on Megatron-core."""
from megatron_cpt.models.qwen2 import (ATTENTION_BACKENDS, BuildOptions, ModelConfig,
                                       build_gpt_model, layer_spec, transformer_config,
                                       transformer_engine_available)

__all__ = ["ATTENTION_BACKENDS", "BuildOptions", "ModelConfig", "build_gpt_model", "layer_spec",
           "transformer_config", "transformer_engine_available"]
