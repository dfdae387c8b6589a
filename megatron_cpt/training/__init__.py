"""Continued pretraining on Megatron-core: config, budget, data, checkpoints, signals,
metrics and the loop. Import submodules directly (they import torch lazily where possible)."""
