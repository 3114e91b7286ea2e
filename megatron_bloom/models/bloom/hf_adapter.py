"""BLOOM <-> transformers: configuration fields and state-dict keys.

Our full state dict uses transformers' ``BloomForCausalLM`` keys without ``lm_head.weight``
(tied), so the key map only adds the ``transformer.`` prefix that ``BloomModel`` saves lack.
"""
from __future__ import annotations

from typing import Any, Dict

from megatron_bloom.errors import UserError
from megatron_bloom.models.bloom.config import ModelConfig


def _first(values: Dict[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if values.get(name) is not None:
            return values[name]
    return default


def config_from_hf(values: Dict[str, Any], where: str = "config.json") -> ModelConfig:
    """ModelConfig from a BloomConfig dict (current and older key names)."""
    model_type = values.get("model_type", "bloom")
    if model_type != "bloom":
        raise UserError(f"{where}: model_type is '{model_type}', not 'bloom'")
    try:
        cfg = ModelConfig(
            num_layers=int(_first(values, "n_layer", "num_hidden_layers", "num_layers", default=2)),
            hidden_size=int(_first(values, "hidden_size", "n_embed", default=64)),
            num_attention_heads=int(_first(values, "n_head", "num_attention_heads", default=8)),
            vocab_size=int(_first(values, "vocab_size", default=250880)),
            layer_norm_epsilon=float(_first(values, "layer_norm_epsilon", default=1e-5)),
            init_method_std=float(_first(values, "initializer_range", default=0.02)),
            hidden_dropout=float(_first(values, "hidden_dropout", default=0.0)),
            attention_dropout=float(_first(values, "attention_dropout", default=0.0)),
            apply_residual_connection_post_layernorm=bool(
                values.get("apply_residual_connection_post_layernorm", False)),
        )
    except (TypeError, ValueError) as exc:
        raise UserError(f"{where}: bad value ({exc})") from None
    if "seq_length" in values and values["seq_length"]:
        cfg.seq_length = int(values["seq_length"])
    if cfg.hidden_size % cfg.num_attention_heads:
        raise UserError(f"{where}: hidden_size={cfg.hidden_size} is not divisible by n_head={cfg.num_attention_heads}")
    return cfg


def to_hf_config(model_cfg: ModelConfig, **extra: Any):
    """transformers' ``BloomConfig`` of a ``ModelConfig`` (the inverse of ``config_from_hf``);
    ``extra`` sets further BloomConfig fields (token ids, dropout overrides, attn_implementation)."""
    from transformers import BloomConfig

    values = dict(
        vocab_size=model_cfg.vocab_size,
        hidden_size=model_cfg.hidden_size,
        n_layer=model_cfg.num_layers,
        n_head=model_cfg.num_attention_heads,
        layer_norm_epsilon=model_cfg.layer_norm_epsilon,
        initializer_range=model_cfg.init_method_std,
        apply_residual_connection_post_layernorm=model_cfg.apply_residual_connection_post_layernorm,
        hidden_dropout=model_cfg.hidden_dropout,
        attention_dropout=model_cfg.attention_dropout,
    )
    values.update(extra)
    return BloomConfig(**values)


def hf_key(key: str) -> str:
    """Our full-state-dict key of a transformers key (``BloomModel`` saves lack ``transformer.``)."""
    return key if key.startswith("transformer.") or key.startswith("lm_head.") else "transformer." + key


ARCHITECTURE = "BloomForCausalLM"
"""transformers' class of an exported folder (``architectures`` in config.json)."""
TIED_HEAD_KEY = "lm_head.weight"
"""transformers' LM head, tied to ``EMBEDDING_KEY`` (absent from our state dicts)."""
EMBEDDING_KEY = "transformer.word_embeddings.weight"
