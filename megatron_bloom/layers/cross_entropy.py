"""Cross-entropy over logits split along the vocabulary, without ever gathering them.

Per token: loss = log(sum_v exp(z_v - m)) - (z_t - m), where m is the global max. Each rank
contributes its share of the max, the sum of exponentials and the target logit (only the rank
owning the target id has it) through three all-reduces of [b, s] tensors instead of one of
[b, s, V]. The gradient is softmax - one_hot on each rank's own columns.

Logits of padding rows must already be -inf (the LM head masks them): exp(-inf) = 0, so they take
no probability and receive no gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .mappings import Group, group_size


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start_index, group):
        logits = logits.float()
        # [b, s] global max for numerical stability; it cancels exactly in the gradient.
        logits_max = logits.max(dim=-1).values
        if group_size(group) > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)  # [b, s, V/tp]

        local_v = logits.shape[-1]
        local_target = target - vocab_start_index
        outside = (local_target < 0) | (local_target >= local_v)
        local_target = local_target.masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = target_logit.masked_fill(outside, 0.0)

        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        if group_size(group) > 1:
            dist.all_reduce(target_logit, group=group)
            dist.all_reduce(sum_exp, group=group)
        loss = sum_exp.log() - target_logit  # [b, s]

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, outside = ctx.saved_tensors
        grad = softmax  # reused in place: softmax is not needed again
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -(~outside).to(grad.dtype).unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, vocab_start_index: int = 0, group: Group = None
) -> torch.Tensor:
    """Per-token loss [b, s] (fp32) from this rank's logit columns [b, s, V/tp]."""
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_start_index, group)
