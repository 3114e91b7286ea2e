"""Parameters per pipeline stage and tensor-parallel rank, by arithmetic (nothing is allocated).

The layer list is the one ``models/bloom/pipeline.py`` hands to DeepSpeed's PipelineModule
(Megatron-DeepSpeed's GPTModelPipe numbering)::

    cast_inputs, EmbeddingPipe, to_sequence_first, TransformerBlockPipe x L, to_batch_first,
    FinalLayerNormPipe, EmbeddingPipe

and stages are cut the way PipelineModule cuts it. For BLOOM-176B (L=70, PP=12,
``type:transformer|embedding``) the 72 matching layers split 6 per stage, so stage 0 holds the
embedding and 5 blocks, stages 1-10 hold 6 blocks, stage 11 holds 5 blocks and the tied LM head.

Per-rank counts under tensor parallelism t (h hidden, f = ffn size, Vp padded vocabulary):

    block      4h (two LayerNorms) + (3h^2 + 3h)/t (query_key_value) + h^2/t + h (dense, bias
               replicated) + (fh + f)/t (dense_h_to_4h) + fh/t + h (dense_4h_to_h, bias replicated)
    embedding  Vp h / t on the first stage, and again on the last (tied copy) when PP > 1
    LayerNorms 2h each (the embedding's on the first stage, the final one on the last)
    functions  none (the three weightless steps)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Tuple

from megatron_bloom.config.schema import ModelConfig

EMBEDDING, BLOCK, FINAL_LN = "EmbeddingPipe", "TransformerBlockPipe", "FinalLayerNormPipe"
"""Class names of the pipeline layers (pipeline.py); ``type:REGEX`` partitioning matches them."""
CAST, TO_SEQUENCE_FIRST, TO_BATCH_FIRST = "cast_inputs", "to_sequence_first", "to_batch_first"
"""Names of the weightless functions in the list."""


def layer_names(num_layers: int) -> List[str]:
    return [CAST, EMBEDDING, TO_SEQUENCE_FIRST, *[BLOCK] * num_layers, TO_BATCH_FIRST, FINAL_LN, EMBEDDING]


def block_parameters(cfg: ModelConfig, tp: int = 1) -> int:
    h, f = cfg.hidden_size, cfg.ffn_size
    return 4 * h + (3 * h * h + 3 * h) // tp + h * h // tp + h + (f * h + f) // tp + f * h // tp + h


def total_parameters(cfg: ModelConfig) -> int:
    """All parameters, the tied embedding once (the published BLOOM counts)."""
    h = cfg.hidden_size
    return cfg.padded_vocab_size(1) * h + 4 * h + cfg.num_layers * block_parameters(cfg, 1)


def _uniform(num_items: int, num_parts: int) -> List[int]:
    """Boundaries of ``num_parts`` contiguous parts; the first ``num_items % num_parts`` get one more."""
    if num_items <= num_parts:
        return [min(p, num_items) for p in range(num_parts + 1)]
    q, r = divmod(num_items, num_parts)
    return [p * q + min(p, r) for p in range(num_parts + 1)]


def _balanced_binary(weights: Tuple[int, ...], num_parts: int) -> List[int]:
    """Parts with equal numbers of weight-1 layers (the first parts take the remainder).

    A boundary sits right before the first counted layer of the next part, so uncounted layers
    (LayerNorms) stay with the part before them. Same cut as DeepSpeed's partition_balanced for
    0/1 weights (tests/unit/test_plan.py compares the two).
    """
    if len(weights) <= num_parts:
        return _uniform(len(weights), num_parts)
    counted = [i for i, w in enumerate(weights) if w]
    sizes = _uniform(len(counted), num_parts)
    bounds = [0]
    for p in range(1, num_parts):
        bounds.append(counted[sizes[p]] if sizes[p] < len(counted) else len(weights))
    bounds.append(len(weights))
    return bounds


@lru_cache(maxsize=256)
def partition(num_layers: int, pp: int, method: str) -> Tuple[int, ...]:
    """Stage boundaries over ``layer_names(num_layers)`` (stage i holds [b[i], b[i+1]))."""
    names = layer_names(num_layers)
    if method == "uniform":
        return tuple(_uniform(len(names), pp))
    if method.startswith("type:"):
        regex = re.compile(method[len("type:"):], re.IGNORECASE)
        return tuple(_balanced_binary(tuple(1 if regex.search(n) else 0 for n in names), pp))
    if method == "parameters":
        # Weighted by parameter counts: DeepSpeed's own dynamic program, so the cut is the engine's.
        from deepspeed.runtime.utils import partition_balanced

        cfg = ModelConfig(num_layers=num_layers)
        weights = [_layer_parameters(n, cfg, 1, first=i < 2) for i, n in enumerate(names)]
        return tuple(int(b) for b in partition_balanced(weights, pp))
    raise ValueError(f"pp_partition_method '{method}' must be 'uniform', 'parameters' or 'type:REGEX'")


def _layer_parameters(name: str, cfg: ModelConfig, tp: int, first: bool = False) -> int:
    """Parameters of one layer on one TP rank; ``first``: the embedding that holds its LayerNorm."""
    h = cfg.hidden_size
    if name == EMBEDDING:
        return cfg.padded_vocab_size(tp) * h // tp + (2 * h if first else 0)
    if name == FINAL_LN:
        return 2 * h
    if name == BLOCK:
        return block_parameters(cfg, tp)
    return 0


@dataclass(frozen=True)
class Stage:
    index: int
    blocks: int
    """Transformer blocks on this stage."""
    has_embedding: bool
    """Input embedding (first stage) or the tied LM head (last stage)."""
    is_first: bool
    is_last: bool
    parameters: int
    """Parameters held by one tensor-parallel rank of this stage."""


def stages(cfg: ModelConfig, tp: int, pp: int, method: str = "type:transformer|embedding") -> List[Stage]:
    names = layer_names(cfg.num_layers)
    bounds = partition(cfg.num_layers, pp, method)
    out = []
    for i in range(pp):
        here = names[bounds[i]:bounds[i + 1]]
        # With one stage the tied embedding is one module, counted once; its LayerNorm is on stage 0.
        params = sum(_layer_parameters(n, cfg, tp) for n in set(here) if n == EMBEDDING)
        params += sum(_layer_parameters(n, cfg, tp) for n in here if n != EMBEDDING)
        params += 2 * cfg.hidden_size if i == 0 else 0
        out.append(Stage(i, here.count(BLOCK), EMBEDDING in here, i == 0, i == pp - 1, params))
    return out
