"""Checkpoints: the on-disk format, HF <-> Megatron conversion, verification."""
