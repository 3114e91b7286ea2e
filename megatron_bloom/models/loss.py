"""The language-model loss over vocab-parallel logits, the same for every model family."""
from __future__ import annotations

from typing import Optional

import torch

from megatron_bloom.layers import vocab_parallel_cross_entropy
from megatron_bloom.layers.mappings import Group


def parallel_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: Optional[torch.Tensor] = None,
    vocab_start: int = 0,
    tp_group: Group = None,
) -> torch.Tensor:
    """Token-mean cross entropy over (possibly vocab-split) logits ``[b, s, v/tp]``; labels shifted.

    Equal to ``causal_lm_loss`` on the gathered logits. ``loss_mask`` ``[b, s]`` weights tokens.
    """
    losses = vocab_parallel_cross_entropy(logits, labels, vocab_start, tp_group)  # [b, s] fp32
    if loss_mask is None:
        return losses.mean()
    mask = loss_mask.to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp_min(1.0)

