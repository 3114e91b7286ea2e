"""Collectives of the tensor-parallel region, in pairs whose backward is the forward's dual.

    copy_to_tensor_parallel_region      forward: identity      backward: all-reduce
    reduce_from_tensor_parallel_region  forward: all-reduce    backward: identity
    scatter_to_tensor_parallel_region   forward: split (last)  backward: all-gather (last)
    gather_from_tensor_parallel_region  forward: all-gather    backward: split

A column-parallel linear starts with ``copy`` (every rank consumes the whole input, so the input's
gradient is the sum of every rank's contribution); a row-parallel linear ends with ``reduce``
(every rank holds a partial sum of the output). Every function takes the group it uses; with a
group of one rank (or none) each is the identity.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_bloom.distributed.collectives import all_gather_into, all_reduce_

Group = Optional[dist.ProcessGroup]


def group_size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    return 0 if group is None else dist.get_rank(group)


# ---- private primitives ------------------------------------------------------------------------


def _all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    # Out of place: the autograd graph may still need the input (and gloo reduces in place).
    return all_reduce_(x.contiguous().clone(), group=group)


def _split_last_dim(x: torch.Tensor, group: Group) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    assert x.shape[-1] % size == 0, f"last dim {x.shape[-1]} not divisible by tensor-parallel size {size}"
    return x.chunk(size, dim=-1)[group_rank(group)].contiguous()


def _gather_last_dim(x: torch.Tensor, group: Group) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    return torch.cat(all_gather_into(parts, x.contiguous(), group=group), dim=-1)


# ---- autograd functions ------------------------------------------------------------------------


def _identity(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x


class _Paired(torch.autograd.Function):
    """``forward`` applies one collective of a pair, ``backward`` its dual; both take ``(tensor, group)``."""

    @staticmethod
    def forward(ctx, x, group, forward_fn, backward_fn):
        ctx.group, ctx.backward_fn = group, backward_fn
        return forward_fn(x, group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward_fn(grad, ctx.group), None, None, None


# ---- public wrappers ---------------------------------------------------------------------------


def copy_to_tensor_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _Paired.apply(x, group, _identity, _all_reduce)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _Paired.apply(x, group, _all_reduce, _identity)


def scatter_to_tensor_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _Paired.apply(x, group, _split_last_dim, _gather_last_dim)


def gather_from_tensor_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _Paired.apply(x, group, _gather_last_dim, _split_last_dim)
