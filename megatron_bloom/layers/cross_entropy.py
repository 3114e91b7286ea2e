"""Cross-entropy over logits split along the vocabulary, without ever gathering them.

Per token: loss = log(sum_v exp(z_v - m)) - (z_t - m), where m is the global max. Each rank
contributes its share of the max, the sum of exponentials and the target logit (only the rank
owning the target id has it) through three all-reduces of [b, s] tensors instead of one of
[b, s, V]. The gradient is softmax - one_hot on each rank's own columns.

Memory: the logits are [b, s, V/tp], 8 GB in fp32 for BLOOMZ-7b1's micro-batch of 4 x 2048
tokens at TP=1. No float32 copy of them is made: the float work (shift, exp, softmax) runs over
chunks of ``CHUNK_ELEMENTS`` logits, backward recomputes the softmax chunk by chunk (one more
elementwise pass) from the logits saved for backward (the input itself, in its own dtype: no copy)
and writes the gradient straight in that dtype. The peak is thus the logits, their gradient and
one chunk. The input is never written to: with fp32 logits ``.float()`` would be the caller's
tensor itself. Results are those of the whole-tensor computation: every element goes through the
same float32 operations, only fewer rows at a time.

Logits of padding rows must already be -inf (the LM head masks them): exp(-inf) = 0, so they take
no probability and receive no gradient.
"""
from __future__ import annotations

from typing import Iterator, Tuple

import torch
from torch import Tensor

from megatron_bloom.distributed.collectives import all_reduce_

from .mappings import Group, group_size

CHUNK_ELEMENTS = 2**24
"""Logits per float32 temporary (64 MB): 66 tokens of a 250,880-row vocabulary, 267 at TP=4."""


def _shifted_chunks(rows: Tensor, logits_max: Tensor) -> Iterator[Tuple[int, int, Tensor]]:
    """``(start, end, rows[start:end] - logits_max[start:end])`` in float32, for token ranges of at
    most ``CHUNK_ELEMENTS`` logits (at least one token).

    Every chunk is written into the same buffer, so one float32 chunk exists at a time; the caller
    may work on it in place and is done with it when it asks for the next one.
    """
    tokens, local_v = rows.shape
    step = min(tokens, max(1, CHUNK_ELEMENTS // max(local_v, 1)))
    buffer = torch.empty(step, local_v, dtype=torch.float32, device=rows.device)  # [chunk, V/tp]
    for start in range(0, tokens, step):
        end = min(start + step, tokens)
        # Converted by the copy (exact, as .float() is), then shifted in float32; no other temporary
        # (a mixed-dtype subtraction would make one on the CPU).
        shifted = buffer[: end - start].copy_(rows[start:end])
        yield start, end, shifted.sub_(logits_max[start:end].unsqueeze(-1))


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start_index, group):
        local_v = logits.shape[-1]
        rows = logits.reshape(-1, local_v)  # [n, V/tp], n = b*s; a view of the (contiguous) logits
        # [n] global max for numerical stability; it cancels exactly in the gradient. A max is
        # exact in any float dtype, so it is taken before converting.
        logits_max = rows.max(dim=-1).values.float()
        if group_size(group) > 1:
            all_reduce_(logits_max, "max", group)

        local_target = target.reshape(-1) - vocab_start_index  # [n]
        outside = (local_target < 0) | (local_target >= local_v)
        local_target = local_target.masked_fill(outside, 0)
        target_logit = rows.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).float() - logits_max  # [n]
        target_logit = target_logit.masked_fill(outside, 0.0)

        sum_exp = torch.empty_like(logits_max)  # [n]
        for start, end, shifted in _shifted_chunks(rows, logits_max):  # shifted: [chunk, V/tp] fp32
            torch.sum(shifted.exp_(), dim=-1, out=sum_exp[start:end])
        if group_size(group) > 1:
            all_reduce_(target_logit, "sum", group)
            all_reduce_(sum_exp, "sum", group)
        loss = sum_exp.log() - target_logit  # [n]

        ctx.save_for_backward(logits, logits_max, sum_exp, local_target, outside)
        return loss.view(target.shape)  # [b, s]

    @staticmethod
    def backward(ctx, grad_loss):
        logits, logits_max, sum_exp, local_target, outside = ctx.saved_tensors
        local_v = logits.shape[-1]
        rows = logits.reshape(-1, local_v)  # [n, V/tp]
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)  # [b, s, V/tp], the logits' dtype
        grad_rows = grad.view(-1, local_v)  # [n, V/tp]
        grad_loss = grad_loss.reshape(-1, 1)  # [n, 1]
        minus_one_hot = -(~outside).float().unsqueeze(-1)  # [n, 1]: -1 where this rank holds the target
        for start, end, shifted in _shifted_chunks(rows, logits_max):  # shifted: [chunk, V/tp] fp32
            softmax = shifted.exp_().div_(sum_exp[start:end].unsqueeze(-1))
            softmax.scatter_add_(-1, local_target[start:end].unsqueeze(-1), minus_one_hot[start:end])
            grad_rows[start:end] = softmax.mul_(grad_loss[start:end])  # rounded once to the logits' dtype
        return grad, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, vocab_start_index: int = 0, group: Group = None
) -> torch.Tensor:
    """Per-token loss [b, s] (fp32) from this rank's logit columns [b, s, V/tp].

    Keeps ``logits`` (not a float32 copy) for backward; float32 temporaries are bounded by
    ``CHUNK_ELEMENTS`` logits.
    """
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_start_index, group)
