"""The pipeline's loss functions: called on the last stage with the logits and a micro-batch's labels.

Both take vocab-parallel logits ``[b, s, v/tp]`` and compute the cross entropy across the TP group.

* ``PretrainingLoss``: labels ``(labels, loss_mask)``; the token mean over the micro-batch's
  masked tokens.
* ``FinetuningLoss``: labels ``(labels, loss_weights, norm, *group_ids)``; ``sum(loss *
  loss_weights) * norm[0]``, divided by ``sum(loss_weights)`` when ``norm[1]`` is 1. The data side
  (``training/data.finetune_micro_batches``) picks weights and norm: ``[1, 1]`` makes each
  micro-batch's own mean, as Megatron-DeepSpeed's finetune_t0.py + GPTModelPipe's CrossEntropy
  (``--loss-normalization micro-batch``); ``[scale, 0]`` makes DeepSpeed's mean over micro-batches
  and DP ranks of these values the mean over the GLOBAL batch (``global-batch``). Its ``meter`` (a
  ``monitoring.group_loss.GroupLossMeter``, or None) receives the per-token losses with the weights
  and the ``group_ids`` tensors (e.g. language and task of each token) for per-group reporting.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_bloom.layers import vocab_parallel_cross_entropy
from megatron_bloom.layers.mappings import Group
from megatron_bloom.models.loss import parallel_lm_loss


class PretrainingLoss:
    """Token-mean LM loss of a micro-batch: labels are ``(labels, loss_mask)``."""

    def __init__(self, tp_group: Group, vocab_start: int):
        self.tp_group = tp_group
        self.vocab_start = vocab_start

    def __call__(self, logits: torch.Tensor, labels: Sequence[torch.Tensor]) -> torch.Tensor:
        target, loss_mask = labels[0], (labels[1] if len(labels) > 1 else None)
        return parallel_lm_loss(logits, target, loss_mask, self.vocab_start, self.tp_group)


class FinetuningLoss:
    """Weighted LM loss, per micro-batch or global mean: labels are ``(labels, loss_weights, norm, *group_ids)``."""

    def __init__(self, tp_group: Group, vocab_start: int, meter: Optional[object] = None):
        self.tp_group = tp_group
        self.vocab_start = vocab_start
        self.meter = meter
        """Receives ``add(losses, weights, group_ids)`` for every micro-batch when set; swapped by the trainer."""

    def __call__(self, logits: torch.Tensor, labels: Sequence[torch.Tensor]) -> torch.Tensor:
        target, loss_weights, norm = labels[0], labels[1], labels[2]
        losses = vocab_parallel_cross_entropy(logits, target, self.vocab_start, self.tp_group)  # [b, s] fp32
        weights = loss_weights.to(losses.dtype)
        if self.meter is not None:
            self.meter.add(losses.detach(), weights, labels[3:])
        norm = norm.reshape(-1).to(losses.dtype)
        loss = (losses * weights).sum() * norm[0]
        if norm.numel() < 2:
            return loss
        # Without a host sync: divisor sum(weights) when norm[1] is 1 (finetune_t0.py's
        # loss_mask.sum(): target tokens, or target runs under --norm-target-loss), exactly 1 when
        # it is 0. A micro-batch without a loss-bearing token returns 0 (finetune_t0.py: 0 / 0).
        divisor = norm[1] * weights.sum() + (1 - norm[1])
        return loss / torch.where(divisor > 0, divisor, torch.ones_like(divisor))
