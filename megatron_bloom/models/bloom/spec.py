"""BLOOM's ``ModelSpec``: what the rest of the package uses of BLOOM.

The torch modules are imported when a builder is called, not when the spec is registered: the
configuration (``config.py``, ``sizes.py``) is needed before torch is.
"""
from __future__ import annotations

from typing import Any, List, Optional

from megatron_bloom.models.bloom import hf_adapter, partition, sharding
from megatron_bloom.models.bloom.config import ModelConfig
from megatron_bloom.models.bloom.sizes import NAMED_MODELS
from megatron_bloom.models.spec import ModelSpec


def build_model(cfg: ModelConfig, padded_vocab_size: Optional[int] = None):
    """Single-device ``BloomForCausalLM`` (Megatron init from the current RNG state)."""
    from megatron_bloom.models.bloom.model import BloomForCausalLM

    return BloomForCausalLM(cfg, padded_vocab_size)


def layer_specs(cfg: ModelConfig, padded_vocab_size: int, tp_group=None, tracker=None,
                half_precision: bool = False) -> List[Any]:
    from megatron_bloom.models.bloom.pipeline import bloom_layer_specs

    return bloom_layer_specs(cfg, padded_vocab_size, tp_group, tracker, half_precision)


def build_block(cfg: ModelConfig, layer_number: int):
    from megatron_bloom.models.bloom.pipeline import ParallelTransformerLayerPipe

    return ParallelTransformerLayerPipe(cfg, layer_number)


def parallelize(model, tp_group, tracker=None):
    from megatron_bloom.models.bloom.parallelize import parallelize_bloom

    return parallelize_bloom(model, tp_group, tracker)


BLOOM_SPEC = ModelSpec(
    name="bloom",
    config_cls=ModelConfig,
    named_configs=NAMED_MODELS,
    build_model=build_model,
    layer_specs=layer_specs,
    build_block=build_block,
    parallelize=parallelize,
    partition=partition,
    sharding=sharding,
    hf=hf_adapter,
)
