"""Parameters every tensor-parallel rank holds a copy of, kept equal.

LayerNorm weights and biases and the biases of row-parallel linears are not split by TP: each rank
holds the whole tensor and, in exact arithmetic, applies the same updates to it. BLOOM-176B saw the
copies drift apart in bf16 at TP=4 and added Megatron-DeepSpeed's ``--sync-tp-duplicated-parameters``:
in every forward, each such parameter is replaced by its average over the TP group.

Here one all-reduce per pipeline layer carries all of that layer's copies, in float64 so that the
average of equal copies is exactly the copy (a sum of four equal float32 values can round in float32).
"""
from __future__ import annotations

from typing import Iterator, List

import torch
import torch.nn as nn

from megatron_bloom.distributed.collectives import all_reduce_
from megatron_bloom.layers.mappings import Group, group_size


def is_tp_duplicated(p: nn.Parameter) -> bool:
    """A parameter the TP layers did not shard.

    The TP layers mark their shards ``tensor_model_parallel``; the engine's grad-norm owner marks
    (``mark_grad_norm_owners``) reuse that attribute and keep the answer in ``tp_sharded``.
    """
    sharded = getattr(p, "tp_sharded", None)
    if sharded is None:
        sharded = getattr(p, "tensor_model_parallel", False)
    return not sharded


@torch.no_grad()
def average_over_group_(params: List[nn.Parameter], group: Group) -> None:
    """Replace each parameter by its mean over ``group``, in place, with one all-reduce."""
    flat = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in params])  # [sum numel]
    all_reduce_(flat, group=group)
    flat /= group_size(group)
    offset = 0
    for p in params:
        # Through .data: autograd must not see this as an in-place change of a saved tensor (under
        # 1F1B, earlier micro-batches' backward still holds these parameters).
        p.data.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def _layers(module: nn.Module) -> Iterator[nn.Module]:
    """The modules a forward calls one by one: children, looking through ModuleList/ModuleDict."""
    for child in module.children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            yield from _layers(child)
        else:
            yield child


def sync_tp_duplicated_parameters_(module: nn.Module, group: Group) -> int:
    """Average each layer's TP-duplicated parameters over ``group`` before every forward of it.

    ``module`` is a pipeline stage (or the whole model) whose children are its layers; call this
    after tensor parallelism has marked its shards. Returns the number of layers hooked (0 at TP=1).
    """
    if group_size(group) == 1:
        return 0
    hooked = 0
    for layer in _layers(module):
        params = [p for p in layer.parameters() if is_tp_duplicated(p)]
        if params:
            layer.register_forward_pre_hook(lambda _module, _inputs, params=params: average_over_group_(params, group))
            hooked += 1
    return hooked


def tp_copies_drift(copies: List[torch.Tensor]) -> float:
    """Largest absolute difference between TP rank 0's copy and any other rank's (0.0 if equal)."""
    first = copies[0]
    return max((float((c.double() - first.double()).abs().max()) for c in copies[1:] if not torch.equal(c, first)),
               default=0.0)
