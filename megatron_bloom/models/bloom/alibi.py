"""ALiBi slopes and the float attention bias BLOOM adds to its attention scores.

BLOOM has no position embeddings: each head h adds ``slope[h] * key_position`` to its scores.
Adding a per-key (not per query-key distance) term is enough because softmax is invariant to a
constant added along a row, and ``slope * (k - q)`` differs from ``slope * k`` by a per-row
constant. The same trick keeps working for packed samples as long as a query only sees keys of its
own segment and positions restart at 0 in each segment.

The bias is built in two steps so the expensive, head-independent part is done once per forward:

* ``make_alibi_mask`` -> ``AlibiMask``: key positions and a boolean "may attend" tensor, from the
  padding mask, the packed-sample segment ids and the KV-cache length.
* ``AlibiMask.bias(slopes, dtype)`` -> ``[b, np, sq, sk]`` float bias for the heads whose slopes
  are given. Tensor parallelism gives each rank a contiguous block of heads; pass it
  ``alibi_slopes(num_heads)[start:end]``.

Masked entries hold ``torch.finfo(dtype).min`` (not ``-inf``) as transformers does: a row with no
visible key (a left-padding query) then gets a uniform softmax instead of NaN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


def alibi_slopes(num_heads: int, device: Optional[torch.device] = None) -> Tensor:
    """Per-head ALiBi slopes, float32 ``[num_heads]``, equal to transformers' BLOOM slopes.

    For a power of two n the slopes are ``2**(-8 i / n)``, i = 1..n. Otherwise the first
    ``2**floor(log2 n)`` heads take that geometric series and the remaining heads take every other
    term (odd exponents) of the series for twice that power of two, as in the ALiBi paper.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    closest = 2 ** math.floor(math.log2(num_heads))
    # Same float32 pow(base, int) recipe as transformers so the slopes agree bit for bit.
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32, device=device)
    powers = torch.arange(1, 1 + closest, dtype=torch.int32, device=device)
    slopes = torch.pow(base, powers)
    if closest != num_heads:
        extra_base = torch.tensor(
            2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32, device=device
        )
        remaining = min(closest, num_heads - closest)
        extra_powers = torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32, device=device)
        slopes = torch.cat([slopes, torch.pow(extra_base, extra_powers)])
    return slopes


@dataclass
class AlibiMask:
    """Head-independent part of the attention bias, shared by every layer of one forward.

    The batch dimension is 1 when nothing in it depends on the sample (no padding mask and no
    segment ids); the bias then broadcasts over the batch instead of being materialised b times.
    """

    key_positions: Tensor
    """float32 ``[b|1, sk]``: ALiBi position of each key (0 on masked keys)."""
    allowed: Tensor
    """bool ``[b|1, 1, sq, sk]``: True where the query may attend to the key."""

    @property
    def query_length(self) -> int:
        return self.allowed.shape[-2]

    @property
    def key_length(self) -> int:
        return self.allowed.shape[-1]

    def bias(self, slopes: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Float bias ``[b|1, np, sq, sk]`` for the heads whose slopes are given."""
        slopes = slopes.to(device=self.key_positions.device, dtype=torch.float32)
        # Product in float32 and one rounding to dtype, as transformers builds its alibi tensor.
        alibi = slopes[None, :, None, None] * self.key_positions[:, None, None, :]  # [b|1, np, 1, sk]
        alibi = alibi.to(dtype)
        masked = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=alibi.device)
        return torch.where(self.allowed, alibi, masked)  # [b|1, np, sq, sk]


def make_alibi_mask(
    query_length: int,
    past_length: int = 0,
    attention_mask: Optional[Tensor] = None,
    segment_ids: Optional[Tensor] = None,
    device: Optional[torch.device] = None,
) -> AlibiMask:
    """Key positions and visibility for ``query_length`` new tokens after ``past_length`` cached ones.

    Args:
        query_length: sq, tokens in this forward.
        past_length: tokens already in the KV cache; keys are ``sk = past_length + sq`` long and
            query i sits at key index ``past_length + i``.
        attention_mask: ``[b, sk]``, 1 for real tokens and 0 for padding (transformers' meaning).
            Positions are ``cumsum(mask) - 1`` so left padding does not shift them.
        segment_ids: ``[b, sk]`` ids of packed samples; each contiguous run of equal ids is one
            sample, positions restart at 0 in it and queries see only keys of their own run.
            Id 0 marks padding and is never attended to.
        device: where to build the tensors when neither mask is given.
    """
    key_length = past_length + query_length
    for name, t in (("attention_mask", attention_mask), ("segment_ids", segment_ids)):
        if t is not None and (t.dim() != 2 or t.shape[1] != key_length):
            raise ValueError(
                f"{name} must be [batch, past_length + query_length] = [b, {key_length}], "
                f"got {tuple(t.shape)}"
            )
    if attention_mask is not None:
        device = attention_mask.device
    elif segment_ids is not None:
        device = segment_ids.device

    k_idx = torch.arange(key_length, device=device)  # [sk]
    q_idx = torch.arange(past_length, key_length, device=device)  # [sq]
    allowed = (k_idx[None, :] <= q_idx[:, None])[None, None]  # [1, 1, sq, sk] causal

    if attention_mask is None and segment_ids is None:
        return AlibiMask(k_idx.float()[None], allowed)  # [1, sk], [1, 1, sq, sk]

    batch = (attention_mask if attention_mask is not None else segment_ids).shape[0]
    if attention_mask is not None:
        keep = attention_mask.to(torch.bool)  # [b, sk]
    else:
        keep = torch.ones(batch, key_length, dtype=torch.bool, device=device)
    counts = keep.long().cumsum(-1)  # [b, sk] real tokens up to and including each key

    if segment_ids is None:
        positions = counts - 1
    else:
        keep = keep & (segment_ids != 0)
        counts = keep.long().cumsum(-1)  # [b, sk]
        starts_run = torch.ones_like(segment_ids, dtype=torch.bool)  # [b, sk]
        starts_run[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        run_id = starts_run.long().cumsum(-1)  # [b, sk] index of the contiguous run
        # Index of the first key of each run, carried forward along the run.
        run_start = torch.where(starts_run, k_idx[None, :], torch.zeros_like(k_idx)[None, :])
        run_start = run_start.cummax(-1).values  # [b, sk]
        # Real tokens before the run starts, so positions count only unmasked keys of the run.
        before_run = counts.gather(-1, run_start) - keep.long().gather(-1, run_start)  # [b, sk]
        positions = counts - before_run - 1
        q_run = run_id[:, past_length:]  # [b, sq]
        same_run = q_run[:, :, None] == run_id[:, None, :]  # [b, sq, sk]
        allowed = allowed & same_run[:, None]  # [b, 1, sq, sk]

    positions = torch.where(keep, positions, torch.zeros_like(positions))  # [b, sk]
    allowed = allowed & keep[:, None, None, :]  # [b, 1, sq, sk]
    return AlibiMask(positions.float(), allowed)


def build_alibi_bias(
    slopes: Tensor,
    query_length: int,
    past_length: int = 0,
    attention_mask: Optional[Tensor] = None,
    segment_ids: Optional[Tensor] = None,
    dtype: torch.dtype = torch.float32,
    batch_size: Optional[int] = None,
) -> Tensor:
    """ALiBi + causal + padding + segment bias ``[b, np, sq, sk]`` in one call.

    ``np`` is ``len(slopes)``. Without ``attention_mask`` and ``segment_ids`` the batch dimension is
    1 unless ``batch_size`` is given (then it is an expanded view, no copy).
    """
    mask = make_alibi_mask(query_length, past_length, attention_mask, segment_ids, slopes.device)
    bias = mask.bias(slopes, dtype)  # [b|1, np, sq, sk]
    if batch_size is not None and bias.shape[0] == 1:
        bias = bias.expand(batch_size, -1, -1, -1)  # [b, np, sq, sk]
    return bias
