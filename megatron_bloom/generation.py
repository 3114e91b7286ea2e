"""Text generation with our single-device BLOOM and its KV cache.

A model comes from a native checkpoint (any TP/PP: ``read_native_checkpoint`` merges it into one
process) or from a transformers folder (recognised by its ``config.json``). Decoding is
incremental: the prompt runs once with ``use_cache=True``, then one token per step with the cache.
Prompts of different lengths are batched with LEFT padding and an attention mask (positions
come from ``cumsum(mask) - 1``, so padding does not shift ALiBi). Each sequence stops at EOS
(which is kept in its output) or after ``max_new_tokens``.

Padded vocabulary rows (added for TP divisibility) are never sampled: the LM head already gives
them ``finfo.min``, and the sampler sets every logit at or beyond ``vocab_size`` to -inf as well.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from megatron_bloom.errors import UserError
from megatron_bloom.config.schema import ModelConfig


@dataclass
class LoadedModel:
    model: torch.nn.Module
    """``BloomForCausalLM`` in eval mode."""
    config: ModelConfig
    tokenizer_dir: Optional[str]
    """Folder with the checkpoint's own tokenizer files, if it has them."""
    special_tokens: Dict[str, Optional[int]] = field(default_factory=dict)
    """bos/eos/pad ids from the checkpoint (transformers config.json or a conversion record)."""


def load_model(path: str, dtype=None, attention_impl: Optional[str] = None) -> LoadedModel:
    """Load a native checkpoint or a transformers folder into one process."""
    from megatron_bloom.checkpoint.hf import has_tokenizer_files
    from megatron_bloom.checkpoint.native import (
        TOKENIZER_DIR,
        checkpoint_special_tokens,
        model_from_state_dict,
        read_native_checkpoint,
    )

    if not os.path.isdir(path):
        raise UserError(f"--load {path} does not exist")
    if os.path.isfile(os.path.join(path, "config.json")):
        from megatron_bloom.checkpoint.hf import read_hf_checkpoint, special_tokens_from_hf

        cfg, sd = read_hf_checkpoint(path)
        with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
            special = special_tokens_from_hf(json.load(fh))
        tokenizer_dir = path if has_tokenizer_files(path) else None
    else:
        cfg, sd = read_native_checkpoint(path)
        special = checkpoint_special_tokens(path)
        candidate = os.path.join(path, TOKENIZER_DIR)
        tokenizer_dir = candidate if os.path.isdir(candidate) and has_tokenizer_files(candidate) else None
    model = model_from_state_dict(cfg, sd, dtype, attention_impl)
    return LoadedModel(model, cfg, tokenizer_dir, special)


def load_tokenizer(folder: str):
    """transformers AutoTokenizer from a local folder (never the hub)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(folder):
        raise UserError(f"tokenizer folder {folder} does not exist")
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UserError(f"cannot load a tokenizer from {folder} ({type(exc).__name__}: {first})") from None


@torch.no_grad()
def prompt_logprobs(model, ids: Sequence[int]) -> List[float]:
    """``[log p(ids[i+1] | ids[:i+1]) for i in range(len(ids) - 1)]`` in float32."""
    if len(ids) < 2:
        return []
    tokens = torch.tensor([list(ids)], dtype=torch.long)  # [1, s]
    logits = model(tokens)[0, :-1].float()  # [s-1, v]
    logp = logits.log_softmax(-1)  # padded rows hold finfo.min: exp() is 0, the normaliser is unchanged
    return logp.gather(-1, tokens[0, 1:, None]).squeeze(-1).tolist()


def _next_tokens(
    logits: Tensor, vocab_size: int, temperature: float, top_p: float, generator: Optional[torch.Generator]
) -> Tensor:
    """``[b, v]`` logits -> ``[b]`` token ids: argmax when ``temperature <= 0``, else top-p sampling."""
    logits = logits.float().clone()
    logits[:, vocab_size:] = float("-inf")  # padded rows
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)  # [b, v]
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # [b, v]
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each one
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the top token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    eos_token_id: Optional[int] = None,
    pad_token_id: int = 0,
) -> List[List[int]]:
    """New token ids for each prompt (EOS included when reached), decoding with the KV cache.

    ``temperature <= 0`` is greedy. Prompts of different lengths are left-padded with
    ``pad_token_id`` and masked.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token")
    if not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    vocab_size = model.config.vocab_size
    for p in prompts:
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the model's vocabulary of {vocab_size}")
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    b, longest = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((b, longest), pad_token_id, dtype=torch.long)  # [b, s]
    mask = torch.zeros(b, longest, dtype=torch.long)  # [b, s]
    for i, p in enumerate(prompts):
        input_ids[i, longest - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, longest - len(p):] = 1
    use_mask = bool((mask == 0).any())  # without padding, the mask-free causal path is the same

    outputs: List[List[int]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool)
    logits, cache = model(input_ids, attention_mask=mask if use_mask else None, use_cache=True)  # [b, s, v]
    for step in range(max_new_tokens):
        tokens = _next_tokens(logits[:, -1], vocab_size, temperature, top_p, generator)  # [b]
        tokens = torch.where(done, torch.full_like(tokens, pad_token_id), tokens)
        for i in range(b):
            if not done[i]:
                outputs[i].append(int(tokens[i]))
        if eos_token_id is not None:
            done |= tokens == eos_token_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if use_mask:
            mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], dim=1)  # [b, past + 1]
        logits, cache = model(
            tokens[:, None], attention_mask=mask if use_mask else None, past_key_values=cache, use_cache=True
        )  # [b, 1, v]
    return outputs
