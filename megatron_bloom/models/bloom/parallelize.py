"""Turn a single-device BLOOM into its Megatron tensor-parallel form, by module replacement.

Each TP rank builds (or loads) the same full model, then keeps its shard. Which module becomes
which is read from the sharding table (``sharding.py``):

    word_embeddings      -> VocabParallelEmbedding   rows   [r*V/tp, (r+1)*V/tp)
    query_key_value      -> ColumnParallelLinear     heads  [r*n/tp, (r+1)*n/tp)  (rows are per head)
    dense                -> RowParallelLinear        input columns of those heads
    dense_h_to_4h        -> ColumnParallelLinear     rows   [r*4h/tp, (r+1)*4h/tp)
    dense_4h_to_h        -> RowParallelLinear        input columns of those rows
    lm_head              -> ParallelLMHead on the local embedding rows (logits stay vocab-split)
    attention dropout    -> draws from the rank's "model-parallel" RNG stream (layers/random.py)
    ALiBi slopes         -> the rank's heads only

LayerNorms and row-parallel biases stay replicated: every rank computes them from identical
inputs, so their gradients, and hence values, are identical across TP ranks.

Because query_key_value stores its rows as [heads, 3, head_dim], a contiguous split of the rows is
a split by heads; no reordering is needed (it would be for a [3, heads, head_dim] layout).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from megatron_bloom.layers import (
    ColumnParallelLinear,
    RNGStatesTracker,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_parallel_region,
)
from megatron_bloom.layers.mappings import Group, group_rank, group_size
from megatron_bloom.models.bloom import sharding
from megatron_bloom.models.bloom.model import BloomForCausalLM, TiedLMHead

_PARALLEL_LINEAR = {sharding.COLUMN: ColumnParallelLinear, sharding.ROW: RowParallelLinear}


class ParallelLMHead(TiedLMHead):
    """Tied LM head on a vocab-parallel embedding: each rank produces its columns of the logits.

    The input goes through ``copy_to_tensor_parallel_region``: every rank consumes the whole hidden
    state, so its gradient is the sum over ranks.
    """

    def __init__(self, embedding: VocabParallelEmbedding, vocab_size: int, group: Group):
        super().__init__(embedding, vocab_size, embedding.vocab_start_index)
        self.group = group

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(copy_to_tensor_parallel_region(hidden_states, self.group))  # [b, s, v/tp]


def parallelize_bloom(
    model: BloomForCausalLM, tp_group: Group, tracker: Optional[RNGStatesTracker] = None
) -> BloomForCausalLM:
    """Shard ``model`` in place for the calling rank of ``tp_group``; returns it.

    ``model`` must be the full model (same weights on every rank); the padded vocabulary must be
    divisible by the TP size (``ModelConfig.padded_vocab_size(tp)`` guarantees it).
    """
    tp = group_size(tp_group)
    model.tensor_parallel_group = tp_group
    if tp == 1:
        return model
    cfg = model.config
    if cfg.num_attention_heads % tp:
        raise ValueError(f"num_attention_heads={cfg.num_attention_heads} is not divisible by TP={tp}")

    emb = VocabParallelEmbedding(model.transformer.word_embeddings, tp_group)
    model.transformer.word_embeddings = emb
    model.lm_head = ParallelLMHead(emb, cfg.vocab_size, tp_group)

    for block in model.transformer.h:
        shard_block_(block, cfg, tp_group, tracker)
    return model


def shard_block_(block: nn.Module, cfg, tp_group: Group, tracker: Optional[RNGStatesTracker]) -> None:
    """Replace one BloomBlock's linears by their TP shards for the calling rank (in place).

    ``tracker`` (any TP size) becomes the stream the block's attention dropout draws from.
    """
    tp, rank = group_size(tp_group), group_rank(tp_group)
    if tracker is not None:
        block.self_attention.rng_tracker = tracker
    elif tp > 1 and cfg.attention_dropout > 0:
        raise ValueError("attention_dropout > 0 with TP > 1 needs a model-parallel RNG tracker")
    if tp == 1:
        return
    heads_per_rank = cfg.num_attention_heads // tp
    for kind, parallel_linear in _PARALLEL_LINEAR.items():
        for path in sharding.block_linears(kind):
            parent_path, _, name = path.rpartition(".")
            parent = block.get_submodule(parent_path)
            setattr(parent, name, parallel_linear(getattr(parent, name), tp_group))
    block.self_attention.set_head_range(rank * heads_per_rank, heads_per_rank)


def vocab_start_index(model: nn.Module) -> int:
    return getattr(model.lm_head, "vocab_start_index", 0)
