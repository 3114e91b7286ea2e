"""Megatron's weight init, one piece at a time, so a pipeline stage can initialise only its layers.

N(0, std) for matrices and embeddings; the two projections that write into the residual stream
(attention ``dense`` and ``dense_4h_to_h``) use std / sqrt(2 * num_layers) so the residual's
variance does not grow with depth; biases zero; LayerNorms ones/zeros; embedding rows past the
real vocabulary zero (they are masked everywhere and never trained).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from megatron_bloom.models.bloom.config import ModelConfig


@torch.no_grad()
def init_embedding_(embedding: nn.Embedding, cfg: ModelConfig) -> None:
    nn.init.normal_(embedding.weight, 0.0, cfg.init_method_std)
    embedding.weight[cfg.vocab_size :].zero_()


@torch.no_grad()
def init_layernorm_(ln: nn.LayerNorm) -> None:
    nn.init.ones_(ln.weight)
    nn.init.zeros_(ln.bias)


@torch.no_grad()
def init_block_(block: nn.Module, cfg: ModelConfig) -> None:
    """Initialise one BloomBlock in place (weights drawn in a fixed order from the default RNG)."""
    std = cfg.init_method_std
    out_std = std / math.sqrt(2.0 * cfg.num_layers)
    for linear, s in (
        (block.self_attention.query_key_value, std),
        (block.self_attention.dense, out_std),
        (block.mlp.dense_h_to_4h, std),
        (block.mlp.dense_4h_to_h, out_std),
    ):
        nn.init.normal_(linear.weight, 0.0, s)
        nn.init.zeros_(linear.bias)
    init_layernorm_(block.input_layernorm)
    init_layernorm_(block.post_attention_layernorm)
