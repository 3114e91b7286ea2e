"""BLOOM: single-device model, ALiBi, named architectures."""
from megatron_bloom.models.bloom.alibi import AlibiMask, alibi_slopes, build_alibi_bias, make_alibi_mask
from megatron_bloom.models.bloom.configs import NAMED_MODELS, count_parameters, named_model_config
from megatron_bloom.models.bloom.model import (
    BloomAttention,
    BloomBlock,
    BloomForCausalLM,
    BloomMLP,
    BloomModel,
    TiedLMHead,
    causal_lm_loss,
)

__all__ = [
    "AlibiMask",
    "alibi_slopes",
    "build_alibi_bias",
    "make_alibi_mask",
    "NAMED_MODELS",
    "count_parameters",
    "named_model_config",
    "BloomAttention",
    "BloomBlock",
    "BloomForCausalLM",
    "BloomMLP",
    "BloomModel",
    "TiedLMHead",
    "causal_lm_loss",
]
