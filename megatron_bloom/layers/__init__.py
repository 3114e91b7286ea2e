"""Tensor-parallel building blocks (Megatron-style), each taking the process group it uses."""
from .cross_entropy import vocab_parallel_cross_entropy
from .embedding import VocabParallelEmbedding, vocab_range
from .linear import ColumnParallelLinear, RowParallelLinear
from .mappings import (
    copy_to_tensor_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    scatter_to_tensor_parallel_region,
)
from .random import RNGStatesTracker, model_parallel_tracker, seed_dropout_streams

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy",
    "vocab_range",
    "copy_to_tensor_parallel_region",
    "gather_from_tensor_parallel_region",
    "reduce_from_tensor_parallel_region",
    "scatter_to_tensor_parallel_region",
    "RNGStatesTracker",
    "model_parallel_tracker",
    "seed_dropout_streams",
]
