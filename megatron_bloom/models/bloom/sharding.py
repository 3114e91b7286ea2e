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

EMBEDDING: Dict[str, str] = {"word_embeddings.weight": VOCAB}
EMBEDDING_LAYERNORM: Dict[str, str] = {
    "word_embeddings_layernorm.weight": REPLICATED,
    "word_embeddings_layernorm.bias": REPLICATED,
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
FINAL_LAYERNORM: Dict[str, str] = {"ln_f.weight": REPLICATED, "ln_f.bias": REPLICATED}

LAYERS: Tuple[Dict[str, str], ...] = (EMBEDDING, EMBEDDING_LAYERNORM, BLOCK, FINAL_LAYERNORM)
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


def block_linears(kind: str) -> List[str]:
    """Module paths inside a block whose weight has ``kind`` (column or row), in table order."""
    return [k.rsplit(".", 1)[0] for k, v in BLOCK.items() if v == kind and k.endswith(".weight")]


def _pattern(name: str) -> str:
    return ".*" + re.escape(name) + "$"


def universal_patterns() -> Dict[str, List[str]]:
    """Parameter-name regexes for DeepSpeed's universal checkpoints (``ds_to_universal``).

    Replicated modules whose weight and bias are both replicated give one ``(weight|bias)``
    pattern, listed before the single replicated parameters (the row-parallel biases).
    """
    replicated = [k for k, v in kinds.items() if v == REPLICATED]
    modules = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in replicated))
    whole = [m for m in modules if {f"{m}.weight", f"{m}.bias"} <= set(replicated)]
    single = [k for k in replicated if k.rsplit(".", 1)[0] not in whole]
    vocabulary = [_pattern(k) for k, v in kinds.items() if v == VOCAB]
    return {
        "tp_replicated_parameter_patterns": [".*" + re.escape(m) + r"\.(weight|bias)$" for m in whole]
        + [_pattern(k) for k in single],
        "parameter_with_row_parallelism_patterns": [_pattern(k) for k, v in kinds.items() if v == ROW],
        "vocabulary_parameter_patterns": vocabulary,
        # The tied embedding's copy on the last stage: dropped, the first stage's kept.
        "pipeline_replicated_parameter_patterns": list(vocabulary),
    }
