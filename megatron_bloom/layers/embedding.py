"""Vocabulary-parallel embedding: rank r holds rows [r * V/tp, (r + 1) * V/tp) of the table."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .mappings import Group, group_rank, group_size, reduce_from_tensor_parallel_region


def vocab_range(padded_vocab_size: int, rank: int, world_size: int):
    assert padded_vocab_size % world_size == 0, (padded_vocab_size, world_size)
    per = padded_vocab_size // world_size
    return rank * per, (rank + 1) * per


class VocabParallelEmbedding(nn.Module):
    """Lookup on the local rows; ids owned by other ranks give zeros, and the all-reduce fills them."""

    def __init__(self, full: nn.Embedding, group: Group):
        super().__init__()
        self.group = group
        self.num_embeddings = full.num_embeddings
        self.embedding_dim = full.embedding_dim
        self.vocab_start_index, self.vocab_end_index = vocab_range(
            full.num_embeddings, group_rank(group), group_size(group)
        )
        rows = full.weight.detach()[self.vocab_start_index : self.vocab_end_index].clone()
        self.weight = nn.Parameter(rows)  # [V/tp, h]
        self.weight.tensor_model_parallel = True

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if group_size(self.group) == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start_index) | (input_ids >= self.vocab_end_index)
        local_ids = (input_ids - self.vocab_start_index).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight)  # [b, s, h]
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel_region(out, self.group)
