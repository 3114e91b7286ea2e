"""megatron-bloom: Megatron-style 3D-parallel pretraining and finetuning for BLOOM."""

__version__ = "0.1.0"
