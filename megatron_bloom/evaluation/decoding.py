"""Batched decoding with the KV cache that stops each row on EOS or on a caller's test (stop strings).

Like ``megatron_bloom.generation.generate`` (left padding, an attention mask so padding does not
shift ALiBi positions, one token per step from the cache), plus a per-row ``is_done`` callback, so
lm-eval's ``until`` strings end a row as soon as they appear and the batch stops when every row has.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

from megatron_bloom.generation import _next_tokens


@torch.no_grad()
def decode_until(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    is_done: Callable[[int, List[int]], bool],
    eos_token_id: Optional[int],
    pad_token_id: int,
    device: Optional[torch.device] = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> List[List[int]]:
    """New tokens per prompt: at most ``max_new_tokens``, ending at EOS (kept) or when
    ``is_done(row, new_tokens)`` is true. Greedy when ``temperature <= 0``."""
    device = device or next(model.parameters()).device
    b = len(prompts)
    outputs: List[List[int]] = [[] for _ in range(b)]
    if b == 0 or max_new_tokens <= 0:
        return outputs
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    input_ids = torch.full((b, longest), pad_token_id, dtype=torch.long)  # [b, s]
    mask = torch.zeros(b, longest, dtype=torch.long)  # [b, s]
    for i, p in enumerate(prompts):
        input_ids[i, longest - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, longest - len(p):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    use_mask = bool((mask == 0).any())  # without padding the mask-free causal path is the same
    vocab_size = model.config.vocab_size
    done = [False] * b
    logits, cache = model(input_ids, attention_mask=mask if use_mask else None, use_cache=True)  # [b, s, v]
    for step in range(max_new_tokens):
        tokens = _next_tokens(logits[:, -1], vocab_size, temperature, top_p, generator)  # [b]
        for i in range(b):
            if done[i]:
                continue
            token = int(tokens[i])
            outputs[i].append(token)
            done[i] = (eos_token_id is not None and token == eos_token_id) or is_done(i, outputs[i])
        if all(done) or step == max_new_tokens - 1:
            break
        feed = torch.tensor([pad_token_id if d else int(t) for d, t in zip(done, tokens)], device=device)  # [b]
        if use_mask:
            mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long, device=device)], dim=1)  # [b, past + 1]
        logits, cache = model(feed[:, None], attention_mask=mask if use_mask else None,
                              past_key_values=cache, use_cache=True)  # [b, 1, v]
    return outputs
