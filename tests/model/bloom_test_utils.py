"""Helpers shared by the BLOOM model tests: tiny transformers twins of our model."""
from __future__ import annotations

import dataclasses

import torch
import transformers

from megatron_bloom.config.schema import ModelConfig
from megatron_bloom.models.bloom.model import BloomForCausalLM


def tiny_config(**overrides) -> ModelConfig:
    base = dict(
        num_layers=2,
        hidden_size=48,
        num_attention_heads=6,
        vocab_size=250,
        init_method_std=0.02,
        attention_impl="eager",
        # Parity with transformers and between kernels is exact only without dropout; tests of
        # dropout itself pass their rates.
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    return ModelConfig(**dict(base, **overrides))


def hf_twin(cfg: ModelConfig, seed: int = 0, initializer_range: float = 0.1):
    """A transformers BLOOM with cfg's shape; larger-than-default init so attention is peaked
    (flat attention would hide ALiBi and masking mistakes)."""
    from megatron_bloom.checkpoint.hf import bloom_config_from_model_config

    hcfg = bloom_config_from_model_config(cfg, hidden_dropout=0.0, attention_dropout=0.0,
                                          initializer_range=initializer_range, attn_implementation="eager")
    torch.manual_seed(seed)
    hf = transformers.BloomForCausalLM(hcfg).eval()
    # transformers zero-inits LayerNorm affine params and biases; randomise them so the test
    # would notice a mix-up between, say, input_layernorm and post_attention_layernorm.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layernorm" in name or "ln_f" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return hf


def load_hf_into_ours(hf, cfg: ModelConfig) -> BloomForCausalLM:
    ours = BloomForCausalLM(cfg).eval()
    sd = dict(hf.state_dict())
    emb = sd["transformer.word_embeddings.weight"]
    padded = torch.zeros(ours.padded_vocab_size, emb.shape[1], dtype=emb.dtype)
    padded[: emb.shape[0]] = emb
    sd["transformer.word_embeddings.weight"] = padded
    sd["lm_head.weight"] = padded
    ours.load_state_dict(sd, strict=True)
    return ours


def twin_models(seed: int = 0, **overrides):
    cfg = tiny_config(**overrides)
    hf = hf_twin(cfg, seed)
    return hf, load_hf_into_ours(hf, cfg), cfg


def with_impl(model: BloomForCausalLM, impl: str) -> BloomForCausalLM:
    """Same weights, other attention kernel."""
    cfg = dataclasses.replace(model.config, attention_impl=impl)
    other = BloomForCausalLM(cfg).eval()
    other.load_state_dict(model.state_dict())
    return other
