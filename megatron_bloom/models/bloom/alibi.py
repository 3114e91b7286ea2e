"""ALiBi slopes and the float attention bias BLOOM adds to its attention scores.

BLOOM has no position embeddings: each head h adds ``slope[h] * key_position`` to its scores.
Adding a per-key (not per query-key distance) term is enough because softmax is invariant to a
constant added along a row, and ``slope * (k - q)`` differs from ``slope * k`` by a per-row
constant. The same trick keeps working for packed samples as long as a query only sees keys of its
own segment and positions restart at 0 in each segment.

The bias is built in two steps so the expensive, head-independent part is done once per forward:

* ``make_alibi_mask`` -> ``AlibiMask``: key positions and a boolean "may attend" tensor, from the
  padding mask, the packed-sample segment ids and the KV-cache length.
* ``AlibiMask.bias(slopes, dtype, heads)`` -> ``[b|1, np, sq, sk]`` float bias for the heads whose
  slopes are given. Tensor parallelism gives each rank a contiguous block of heads; pass it
  ``alibi_slopes(num_heads)[start:end]``.

The dense bias is large (BLOOM-176B at TP=4: 28 heads x 2048^2 x 2 bytes = 235 MB; packed BLOOMZ-7b1
micro-batches of 4: 1 GB) and attention kernels keep it for backward, so it is built once per
forward and shared: a mask given a ``heads`` name returns the same tensor to every layer asking for
those heads in that dtype (every layer of one rank does), and ``AlibiMaskCache`` hands the pipeline
blocks of a stage, which receive only ``(hidden, segment_ids)``, one mask per micro-batch.

Masked entries hold ``torch.finfo(dtype).min`` (not ``-inf``) as transformers does: a row with no
visible key (a left-padding query) then gets a uniform softmax instead of NaN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Hashable, Optional, Tuple, Union

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
    biases: Dict[Tuple[Hashable, torch.dtype], Tensor] = field(default_factory=dict, repr=False, compare=False)
    """The biases built so far, by ``(heads, dtype)``; they live as long as the mask."""

    @property
    def query_length(self) -> int:
        return self.allowed.shape[-2]

    @property
    def key_length(self) -> int:
        return self.allowed.shape[-1]

    def bias(self, slopes: Tensor, dtype: torch.dtype = torch.float32, heads: Optional[Hashable] = None) -> Tensor:
        """Float bias ``[b|1, np, sq, sk]`` for the heads whose slopes are given.

        ``heads`` names the heads ``slopes`` belong to (``BloomAttention`` passes ``(first head,
        count, total heads)``, which fix the slopes): the bias is built by the first call with that
        name and dtype, and later calls get the same tensor. Without a name it is built every time.
        The name is a host-side key so that no layer compares slopes on the device (a sync).
        """
        if heads is None:
            return self.build_bias(slopes, dtype)
        key = (heads, dtype)
        if key not in self.biases:
            self.biases[key] = self.build_bias(slopes, dtype)
        return self.biases[key]

    def build_bias(self, slopes: Tensor, dtype: torch.dtype) -> Tensor:
        """A new float bias ``[b|1, np, sq, sk]`` (see ``bias``, which shares one)."""
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


class AlibiMaskCache:
    """The mask of the latest forward, for pipeline blocks that each rebuild it from what reaches them.

    A pipeline block receives ``(hidden, segment_ids)`` or ``hidden`` (a mask cannot travel
    between stages, and a block does not know whether it is the last of its stage). The blocks of
    one stage share one cache: the first block of a micro-batch's forward builds the mask, the
    others get the same one, and with it the same bias (``AlibiMask.bias``).

    The key is the sequence length, the device and the segment ids: the same tensor object, not
    written since (its version counter), and held here so that its identity cannot pass to a new
    tensor. Without segment ids the mask depends on the length alone and serves every
    micro-batch; a recomputed block (activation checkpointing replays the block's inputs, the same
    objects) finds its micro-batch's mask if it is still the latest, else rebuilds it once for
    all blocks of the stage. The latest mask stays alive until the next one replaces it.
    """

    def __init__(self) -> None:
        self._key: Optional[Tuple[int, torch.device, Union[int, object, None]]] = None
        self._segment_ids: Optional[Tensor] = None
        self._mask: Optional[AlibiMask] = None

    def __repr__(self) -> str:
        return "AlibiMaskCache()"

    def get(self, query_length: int, segment_ids: Optional[Tensor], device: torch.device) -> AlibiMask:
        """``make_alibi_mask(query_length, segment_ids=segment_ids, device=device)``, shared."""
        if segment_ids is None:
            version = None
        else:
            # Inference tensors have no version counter: they are never taken from the cache.
            version = object() if segment_ids.is_inference() else segment_ids._version
        key = (query_length, torch.device(device), version)
        if self._mask is None or key != self._key or segment_ids is not self._segment_ids:
            self._mask = self._segment_ids = None  # freed (unless saved for backward) before the next is built
            self._mask = make_alibi_mask(query_length, 0, None, segment_ids, device)
            self._key, self._segment_ids = key, segment_ids
        return self._mask


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
