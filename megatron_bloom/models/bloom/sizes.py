"""Named BLOOM architectures and a parameter counter that allocates nothing.

The released checkpoints all have 250,880 embedding rows (the tokenizer's 250,680 tokens padded
by Megatron), sequence length 2048, LayerNorm epsilon 1e-5. Dropout is a training choice, not part
of the architecture: a named model keeps the run's (0.1 by default, as BLOOM trained).
"""
from __future__ import annotations

from typing import Any, Dict

from megatron_bloom.models.bloom.config import ModelConfig

BLOOM_PADDED_VOCAB = 250_880
"""Embedding rows of every released BLOOM: the tokenizer's 250,680 tokens padded by Megatron."""

_BLOOM_COMMON: Dict[str, Any] = dict(
    vocab_size=BLOOM_PADDED_VOCAB,
    seq_length=2048,
    layer_norm_epsilon=1e-5,
    init_method_std=0.0048,
)

NAMED_MODELS: Dict[str, Dict[str, Any]] = {
    "bloom-560m": dict(_BLOOM_COMMON, num_layers=24, hidden_size=1024, num_attention_heads=16),
    "bloom-1b1": dict(_BLOOM_COMMON, num_layers=24, hidden_size=1536, num_attention_heads=16),
    "bloom-1b7": dict(_BLOOM_COMMON, num_layers=24, hidden_size=2048, num_attention_heads=16),
    "bloom-3b": dict(_BLOOM_COMMON, num_layers=30, hidden_size=2560, num_attention_heads=32),
    "bloom-7b1": dict(_BLOOM_COMMON, num_layers=30, hidden_size=4096, num_attention_heads=32),
    "bloom-176b": dict(_BLOOM_COMMON, num_layers=70, hidden_size=14336, num_attention_heads=112),
    # Test sizes: seconds on a CPU. tiny-odd has a head count that is not a power of two and a
    # vocabulary that is not a multiple of 128, the two cases that need padding/slope care.
    "tiny": dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=256, seq_length=128),
    "tiny-odd": dict(num_layers=2, hidden_size=60, num_attention_heads=6, vocab_size=250, seq_length=64),
    "small": dict(num_layers=4, hidden_size=256, num_attention_heads=8, vocab_size=8192, seq_length=512),
}
"""Model name -> ModelConfig field values."""


def named_model_config(name: str, **overrides: Any) -> ModelConfig:
    """``ModelConfig`` of a named architecture; ``overrides`` replace single fields."""
    if name not in NAMED_MODELS:
        raise KeyError(f"unknown model_name {name!r}; known: {', '.join(NAMED_MODELS)}")
    return ModelConfig(model_name=name, **dict(NAMED_MODELS[name], **overrides))


def count_parameters(cfg: ModelConfig, padded_vocab_size: int | None = None) -> int:
    """Number of parameters (the tied embedding counted once), built on the meta device."""
    import torch

    from megatron_bloom.models.bloom.model import BloomForCausalLM

    with torch.device("meta"):
        model = BloomForCausalLM(cfg, padded_vocab_size)
    # parameters() yields each Parameter once, so the tied LM head is not counted again.
    return sum(p.numel() for p in model.parameters())
