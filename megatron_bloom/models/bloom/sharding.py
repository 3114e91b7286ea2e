"""BLOOM's tensor-parallel sharding table: every parameter's kind, in one place.

Keys are layer-local parameter names (a pipeline layer's state-dict keys; a block's keys are the
same for every block). Kinds:

    column      split on dim 0 (output rows): query_key_value, dense_h_to_4h, weights and biases
    row         split on dim 1 (input columns): attention dense, dense_4h_to_h weights
    vocab       split on dim 0 after padding the rows to the TP size: the word embeddings
    replicated  whole on every TP rank (LayerNorms, row-parallel biases): the TP-duplicated ones

query_key_value stores its rows per head ([heads, 3, head_dim]), so a column split is a head split.
Derived from this table: the module swaps of ``parallelize.py``, the merge/split rules of native
checkpoints and the patterns published for DeepSpeed's universal checkpoints.
"""
from __future__ import annotations

import re
from typing import Dict, List, Tuple

COLUMN, ROW, VOCAB, REPLICATED = "column", "row", "vocab", "replicated"

EMBEDDING: Dict[str, str] = {
    "word_embeddings.weight": VOCAB,
    # Megatron-DeepSpeed's --embed-layernorm: a LayerNorm inside the embedding module.
    "word_embeddings.norm.weight": REPLICATED,
    "word_embeddings.norm.bias": REPLICATED,
}
BLOCK: Dict[str, str] = {
    "input_layernorm.weight": REPLICATED,
    "input_layernorm.bias": REPLICATED,
    "self_attention.query_key_value.weight": COLUMN,
    "self_attention.query_key_value.bias": COLUMN,
    "self_attention.dense.weight": ROW,
    "self_attention.dense.bias": REPLICATED,
    "post_attention_layernorm.weight": REPLICATED,
    "post_attention_layernorm.bias": REPLICATED,
    "mlp.dense_h_to_4h.weight": COLUMN,
    "mlp.dense_h_to_4h.bias": COLUMN,
    "mlp.dense_4h_to_h.weight": ROW,
    "mlp.dense_4h_to_h.bias": REPLICATED,
}
FINAL_LAYERNORM: Dict[str, str] = {"weight": REPLICATED, "bias": REPLICATED}
"""A bare LayerNorm is the pipeline layer, so its keys have no module prefix."""

LAYERS: Tuple[Dict[str, str], ...] = (EMBEDDING, BLOCK, FINAL_LAYERNORM)
"""The tables in pipeline order (the tied LM head reuses the embedding's)."""

kinds: Dict[str, str] = {k: v for table in LAYERS for k, v in table.items()}
"""Layer-local parameter name -> kind, over every layer."""

_DIM = {COLUMN: 0, ROW: 1, VOCAB: 0}

split_dim: Dict[str, int] = {k: _DIM[v] for k, v in kinds.items() if v in _DIM}
"""Layer-local name -> the dim its TP shards are concatenated on; absent means replicated."""

tp_duplicated = frozenset(k for k, v in kinds.items() if v == REPLICATED)
"""Parameters every TP rank holds whole (kept equal by ``--sync-tp-duplicated-parameters``)."""

block_keys: Tuple[str, ...] = tuple(BLOCK)
embedding_key: str = next(iter(EMBEDDING))


# ---- pipeline layer numbering --------------------------------------------------------------------
#
# Megatron-DeepSpeed's GPTModelPipe, whose numbering its checkpoints (layer_XX-model_YY files) and
# transformers' BLOOM converter rely on:
#
#     0        a cast of the inputs to half precision      (no weights, no file)
#     1        the embedding with its LayerNorm            EMBEDDING keys, tied "embed"
#     2        a transpose to sequence-first               (no weights, no file)
#     3+i      block i                                     BLOCK keys
#     L+3      the transpose back                          (no weights, no file)
#     L+4      the final LayerNorm                         FINAL_LAYERNORM keys
#     L+5      the tied embedding as LM head               (owns no file)

EMBEDDING_LAYER = 1
FIRST_BLOCK_LAYER = 3


def block_layer(i: int) -> int:
    """Pipeline index of block ``i``."""
    return FIRST_BLOCK_LAYER + i


def final_norm_layer(num_layers: int) -> int:
    return FIRST_BLOCK_LAYER + num_layers + 1


def weight_layers(num_layers: int) -> List[int]:
    """Indices of the pipeline layers with weights, i.e. with a file per TP rank in a checkpoint."""
    return [EMBEDDING_LAYER, *map(block_layer, range(num_layers)), final_norm_layer(num_layers)]


def layer_table(idx: int, num_layers: int) -> Dict[str, str]:
    """Layer-local key -> kind of pipeline layer ``idx`` (one of ``weight_layers``)."""
    if idx == EMBEDDING_LAYER:
        return EMBEDDING
    if FIRST_BLOCK_LAYER <= idx < FIRST_BLOCK_LAYER + num_layers:
        return BLOCK
    if idx == final_norm_layer(num_layers):
        return FINAL_LAYERNORM
    raise ValueError(f"pipeline layer {idx} has no weights (layers with weights: {weight_layers(num_layers)})")


_FULL_NAMES = {
    "word_embeddings.weight": "transformer.word_embeddings.weight",
    "word_embeddings.norm.weight": "transformer.word_embeddings_layernorm.weight",
    "word_embeddings.norm.bias": "transformer.word_embeddings_layernorm.bias",
    "weight": "transformer.ln_f.weight",
    "bias": "transformer.ln_f.bias",
}


def full_key(idx: int, key: str, num_layers: int) -> str:
    """The full-state-dict key (transformers' names) of layer ``idx``'s layer-local ``key``."""
    table = layer_table(idx, num_layers)
    if key not in table:
        raise KeyError(f"pipeline layer {idx} has no parameter '{key}'")
    if table is BLOCK:
        return f"transformer.h.{idx - FIRST_BLOCK_LAYER}.{key}"
    return _FULL_NAMES[key]


def block_linears(kind: str) -> List[str]:
    """Module paths inside a block whose weight has ``kind`` (column or row), in table order."""
    return [k.rsplit(".", 1)[0] for k, v in BLOCK.items() if v == kind and k.endswith(".weight")]


_BARE = r"(^|.*\.)\d+\."
"""Start of a bare LayerNorm's parameter name: "<layer index>." under an optional module prefix
("layers.7.weight" in BloomSequential, "7.weight" in a PipelineModule)."""


def _pattern(name: str) -> str:
    return (_BARE if "." not in name else ".*") + re.escape(name) + "$"


def universal_patterns() -> Dict[str, List[str]]:
    """Parameter-name regexes for DeepSpeed's universal checkpoints (``ds_to_universal``).

    Replicated modules whose weight and bias are both replicated give one ``(weight|bias)``
    pattern, listed before the single replicated parameters (the row-parallel biases).
    """
    replicated = [k for k, v in kinds.items() if v == REPLICATED]
    modules = list(dict.fromkeys(k.rsplit(".", 1)[0] if "." in k else "" for k in replicated))
    whole = [m for m in modules if {f"{m}.weight".lstrip("."), f"{m}.bias".lstrip(".")} <= set(replicated)]
    single = [k for k in replicated if (k.rsplit(".", 1)[0] if "." in k else "") not in whole]
    vocabulary = [_pattern(k) for k, v in kinds.items() if v == VOCAB]
    return {
        "tp_replicated_parameter_patterns": [(".*" + re.escape(m) + r"\." if m else _BARE) + "(weight|bias)$"
                                             for m in whole] + [_pattern(k) for k in single],
        "parameter_with_row_parallelism_patterns": [_pattern(k) for k, v in kinds.items() if v == ROW],
        "vocabulary_parameter_patterns": vocabulary,
        # The tied embedding's copy on the last stage: dropped, the first stage's kept.
        "pipeline_replicated_parameter_patterns": list(vocabulary),
    }
