"""BLOOM's sharding table and what is derived from it (module swaps, checkpoint merge rules, universal patterns).

The expected literals are the hand-written values the derived ones replace: a change to the table
that changes any of them changes the on-disk checkpoint format.
"""
import pytest
import torch

from megatron_bloom.checkpoint.native import BLOCK_KEYS, EMBEDDING_KEY, SPLIT_DIM
from megatron_bloom.checkpoint.universal import universal_checkpoint_info
from megatron_bloom.config.schema import ModelConfig
from megatron_bloom.layers.duplicated import is_tp_duplicated
from megatron_bloom.models.spec import get_model_spec

EXPECTED_BLOCK_KEYS = (
    "input_layernorm.weight", "input_layernorm.bias",
    "self_attention.query_key_value.weight", "self_attention.query_key_value.bias",
    "self_attention.dense.weight", "self_attention.dense.bias",
    "post_attention_layernorm.weight", "post_attention_layernorm.bias",
    "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
    "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias",
)
EXPECTED_SPLIT_DIM = {
    "self_attention.query_key_value.weight": 0,
    "self_attention.query_key_value.bias": 0,
    "mlp.dense_h_to_4h.weight": 0,
    "mlp.dense_h_to_4h.bias": 0,
    "self_attention.dense.weight": 1,
    "mlp.dense_4h_to_h.weight": 1,
    "word_embeddings.weight": 0,
}
EXPECTED_UNIVERSAL = {
    "universal_checkpoint_version": 0.2,
    "tp_replicated_parameter_patterns": [
        r".*word_embeddings\.norm\.(weight|bias)$",
        r".*input_layernorm\.(weight|bias)$",
        r".*post_attention_layernorm\.(weight|bias)$",
        r"(^|.*\.)\d+\.(weight|bias)$",  # the final LayerNorm is the pipeline layer itself
        r".*self_attention\.dense\.bias$",
        r".*mlp\.dense_4h_to_h\.bias$",
    ],
    "parameter_with_row_parallelism_patterns": [r".*self_attention\.dense\.weight$", r".*mlp\.dense_4h_to_h\.weight$"],
    "vocabulary_parameter_patterns": [r".*word_embeddings\.weight$"],
    "pipeline_replicated_parameter_patterns": [r".*word_embeddings\.weight$"],
    "original_vocab_size": 256,
    "parameter_to_average_patterns": [],
}


def test_checkpoint_merge_rules_are_the_tables():
    assert BLOCK_KEYS == EXPECTED_BLOCK_KEYS
    assert SPLIT_DIM == EXPECTED_SPLIT_DIM
    assert EMBEDDING_KEY == "word_embeddings.weight"


def test_universal_checkpoint_patterns_are_unchanged():
    assert universal_checkpoint_info(ModelConfig(vocab_size=256)) == EXPECTED_UNIVERSAL


def _local_names(sharding, num_layers):
    """Full-state-dict key -> the layer-local key the table lists it under."""
    return {sharding.full_key(idx, k, num_layers): k
            for idx in sharding.weight_layers(num_layers) for k in sharding.layer_table(idx, num_layers)}


def test_table_covers_every_parameter_of_the_model():
    spec = get_model_spec("bloom")
    model = spec.build_model(ModelConfig(num_layers=2))
    assert {n for n, _ in model.named_parameters()} == set(_local_names(spec.sharding, 2))
    assert set(_local_names(spec.sharding, 2).values()) == set(spec.sharding.kinds)


def test_layer_numbering_is_megatron_deepspeeds():
    """GPTModelPipe's: embedding 1, block i at 3 + i, final LayerNorm at L + 4; keys as it names them."""
    sharding = get_model_spec("bloom").sharding
    assert sharding.weight_layers(70) == [1, *range(3, 73), 74]
    assert sharding.full_key(1, "word_embeddings.norm.weight", 70) == "transformer.word_embeddings_layernorm.weight"
    assert sharding.full_key(72, "mlp.dense_h_to_4h.bias", 70) == "transformer.h.69.mlp.dense_h_to_4h.bias"
    assert sharding.full_key(74, "bias", 70) == "transformer.ln_f.bias"
    with pytest.raises(ValueError):
        sharding.layer_table(73, 70)


def test_parallelized_parameters_match_the_table(monkeypatch):
    """The swaps made by parallelize mark exactly the table's split parameters as TP shards."""
    from megatron_bloom.layers import mappings

    # Rank 0 of a pretend TP group of 2: building the shards needs only the group's size and rank.
    monkeypatch.setattr(mappings.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(mappings.dist, "get_rank", lambda group=None: 0)
    spec = get_model_spec("bloom")
    model = spec.parallelize(spec.build_model(ModelConfig(num_layers=1, attention_dropout=0.0)), object())
    assert model.transformer.h[0].mlp.dense_h_to_4h.weight.shape[0] == 2 * 64  # 4h / 2
    local = _local_names(spec.sharding, 1)
    for name, p in model.named_parameters():
        assert is_tp_duplicated(p) == (local[name] in spec.sharding.tp_duplicated), name
