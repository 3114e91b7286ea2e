"""Named BLOOM architectures: exact parameter counts of the released models (meta device)."""
import pytest

from megatron_bloom.config.schema import ModelConfig
from megatron_bloom.models.bloom.sizes import NAMED_MODELS, count_parameters, named_model_config

RELEASED = {
    "bloom-560m": 559_214_592,
    "bloom-1b1": 1_065_314_304,
    "bloom-1b7": 1_722_408_960,
    "bloom-3b": 3_002_557_440,
    "bloom-7b1": 7_069_016_064,
    "bloom-176b": 176_247_271_424,
}


@pytest.mark.parametrize("name,expected", sorted(RELEASED.items()))
def test_parameter_count_of_released_models(name, expected):
    cfg = named_model_config(name)
    assert cfg.padded_vocab_size(1) == cfg.vocab_size == 250880  # no extra rows at TP=1
    assert count_parameters(cfg) == expected


def test_every_named_model_is_a_valid_model_config():
    for name, fields in NAMED_MODELS.items():
        cfg = ModelConfig(**fields)
        assert cfg.hidden_size % cfg.num_attention_heads == 0, name
        assert count_parameters(cfg) > 0


def test_padded_rows_are_counted():
    cfg = named_model_config("tiny-odd")  # vocab 250 -> 256 rows
    extra = count_parameters(cfg, padded_vocab_size=512) - count_parameters(cfg)
    assert extra == (512 - 256) * cfg.hidden_size


def test_unknown_name_lists_known_ones():
    with pytest.raises(KeyError, match="bloom-560m"):
        named_model_config("bloom-13b")
