"""megatron-cpt: continued pretraining of Qwen2.5 on Megatron-core under a compute budget."""
__version__ = "0.1.0"
