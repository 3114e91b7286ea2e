"""Parameters per pipeline stage and tensor-parallel rank, by arithmetic (nothing is allocated).

Stages are cut as DeepSpeed's PipelineModule cuts ``models/bloom/pipeline.py``'s layer list
(Megatron-DeepSpeed's GPTModelPipe); ``models/bloom/partition.py`` holds the list and the cut. For
BLOOM-176B (L=70, PP=12, ``type:transformer|embedding``) the 72 matching layers split 6 per stage,
so stage 0 holds the embedding and 5 blocks, stages 1-10 hold 6 blocks, stage 11 holds 5 blocks and
the tied LM head; at PP=72 (BLOOMZ-176B) stage 0 holds only the embedding, stages 1-70 one block
each (70 with the final LayerNorm) and stage 71 only the LM head.

Per-rank counts under tensor parallelism t (h hidden, f = ffn size, Vp padded vocabulary):

    block      4h (two LayerNorms) + (3h^2 + 3h)/t (query_key_value) + h^2/t + h (dense, bias
               replicated) + (fh + f)/t (dense_h_to_4h) + fh/t + h (dense_4h_to_h, bias replicated)
    embedding  Vp h / t on the first stage, and again on the last (tied copy) when PP > 1
    LayerNorms 2h each (the embedding's on the first stage, the final one where the cut puts it)
    functions  none (the weightless steps)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

from megatron_bloom.config.schema import ModelConfig
from megatron_bloom.models.spec import get_model_spec

_cut = get_model_spec().partition
BLOCK, EMBEDDING = _cut.BLOCK, _cut.EMBEDDING
block_parameters, layer_names, layer_parameters, stage_layers = (
    _cut.block_parameters, _cut.layer_names, _cut.layer_parameters, _cut.stage_layers)

__all__ = ["Stage", "block_parameters", "stages", "total_parameters"]


def total_parameters(cfg: ModelConfig) -> int:
    """All parameters, the tied embedding once (the published BLOOM counts)."""
    h = cfg.hidden_size
    return cfg.padded_vocab_size(1) * h + 4 * h + cfg.num_layers * block_parameters(cfg, 1)


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


def stages(cfg: ModelConfig, tp: int, pp: int, method: str = "type:transformer|embedding",
           half_precision: bool = False) -> List[Stage]:
    names = layer_names(cfg.num_layers, half_precision)
    out = []
    for i, idxs in enumerate(stage_layers(cfg, pp, method, tp, half_precision)):
        here = [names[j] for j in idxs]
        embeddings = [j for j in idxs if names[j] == EMBEDDING]
        params = sum(layer_parameters(j, names[j], cfg, tp) for j in idxs if names[j] != EMBEDDING)
        if embeddings:
            # Both tied specs on one stage (PP = 1) build one module: its matrix counts once, and
            # with the LayerNorm when the stage holds the input embedding's spec.
            params += layer_parameters(embeddings[0], EMBEDDING, cfg, tp)
        out.append(Stage(i, here.count(BLOCK), bool(embeddings), i == 0, i == pp - 1, params))
    return out
