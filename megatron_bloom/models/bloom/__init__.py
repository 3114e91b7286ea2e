"""BLOOM: configuration and named sizes, single-device model, ALiBi, pipeline layers, TP sharding.

Importing the package registers ``BLOOM_SPEC`` (``spec.py``) and loads only the configuration;
the torch modules below load on first access.
"""
from __future__ import annotations

import importlib

from megatron_bloom.models.bloom.config import ModelConfig
from megatron_bloom.models.bloom.sizes import NAMED_MODELS, count_parameters, named_model_config
from megatron_bloom.models.bloom.spec import BLOOM_SPEC
from megatron_bloom.models.spec import register_model_spec

register_model_spec(BLOOM_SPEC)

_LAZY = {
    "AlibiMask": "alibi",
    "alibi_slopes": "alibi",
    "build_alibi_bias": "alibi",
    "make_alibi_mask": "alibi",
    "BloomAttention": "model",
    "BloomBlock": "model",
    "BloomForCausalLM": "model",
    "BloomMLP": "model",
    "BloomModel": "model",
    "TiedLMHead": "model",
    "causal_lm_loss": "model",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BLOOM_SPEC", "ModelConfig", "NAMED_MODELS", "count_parameters", "named_model_config", *_LAZY]
