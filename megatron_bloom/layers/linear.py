"""Megatron's column- and row-parallel linears, built from the full weight they shard.

Sharding from a full weight (rather than initializing shards independently) makes every layout
start from the same model: the parity tests compare TP=N against one process exactly.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .mappings import (
    Group,
    copy_to_tensor_parallel_region,
    gather_from_tensor_parallel_region,
    group_rank,
    group_size,
    reduce_from_tensor_parallel_region,
)


def _shard(t: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    size = group_size(group)
    assert t.shape[dim] % size == 0, f"dim {dim} of {tuple(t.shape)} not divisible by tensor-parallel size {size}"
    return t.chunk(size, dim=dim)[group_rank(group)].clone()


class ColumnParallelLinear(nn.Module):
    """Y = X A^T + b with A split by rows (output features): rank r computes Y[..., r-th block].

    ``gather_output=False`` keeps the output sharded for a following row-parallel linear.
    """

    def __init__(self, full: nn.Linear, group: Group, gather_output: bool = False):
        super().__init__()
        self.group = group
        self.gather_output = gather_output
        self.in_features = full.in_features
        self.out_features = full.out_features
        self.weight = nn.Parameter(_shard(full.weight.detach(), 0, group))  # [out/tp, in]
        self.bias = nn.Parameter(_shard(full.bias.detach(), 0, group)) if full.bias is not None else None
        if self.bias is not None:
            self.bias.tensor_model_parallel = True
        self.weight.tensor_model_parallel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_tensor_parallel_region(x, self.group)
        y = F.linear(x, self.weight, self.bias)  # [..., out/tp]
        return gather_from_tensor_parallel_region(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """Y = X A^T + b with A split by columns (input features); X arrives already split.

    Each rank's product is a partial sum; the all-reduce completes it. The bias is replicated and
    added once, after the reduction.
    """

    def __init__(self, full: nn.Linear, group: Group):
        super().__init__()
        self.group = group
        self.in_features = full.in_features
        self.out_features = full.out_features
        self.weight = nn.Parameter(_shard(full.weight.detach(), 1, group))  # [out, in/tp]
        self.weight.tensor_model_parallel = True
        self.bias: Optional[nn.Parameter] = (
            nn.Parameter(full.bias.detach().clone()) if full.bias is not None else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tensor_parallel_region(F.linear(x, self.weight), self.group)  # [..., out]
        return y + self.bias if self.bias is not None else y
