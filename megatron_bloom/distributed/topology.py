"""Rank layout of a TP x PP x DP job, as pure functions of the three sizes.

The order is DeepSpeed's ``PipeModelDataParallelTopology`` (axes pipe, data, model; the last axis
varies fastest), so DeepSpeed's pipeline engine and our tensor/data-parallel groups name the same
ranks::

    rank = (pp_rank * DP + dp_rank) * TP + tp_rank

Tensor-parallel peers are adjacent ranks, which puts them on one node (NVLink) when TP <= GPUs per
node; pipeline neighbours are DP * TP ranks apart.

Worked example, 16 ranks, TP=2, PP=4, DP=2::

    stage 0: ranks 0-3     dp0: [0, 1]    dp1: [2, 3]
    stage 1: ranks 4-7     dp0: [4, 5]    dp1: [6, 7]
    stage 2: ranks 8-11    dp0: [8, 9]    dp1: [10, 11]
    stage 3: ranks 12-15   dp0: [12, 13]  dp1: [14, 15]

    tensor-parallel groups  (same pp, dp):  [0,1] [2,3] [4,5] [6,7] [8,9] [10,11] [12,13] [14,15]
    data-parallel groups    (same pp, tp):  [0,2] [1,3] [4,6] [5,7] [8,10] [9,11] [12,14] [13,15]
    pipeline groups         (same dp, tp):  [0,4,8,12] [1,5,9,13] [2,6,10,14] [3,7,11,15]
    model-parallel groups   (same dp):      [0,1,4,5,8,9,12,13] [2,3,6,7,10,11,14,15]
    embedding groups (first + last stage):  [0,12] [1,13] [2,14] [3,15]

The embedding group holds the two copies of the tied word embedding (input embedding on the first
stage, LM head on the last) whose gradients must be summed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple


class Coord(NamedTuple):
    pp: int
    dp: int
    tp: int


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of the three parallel dimensions; all methods are pure rank arithmetic."""

    tp: int
    pp: int
    dp: int

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp"):
            if getattr(self, name) < 1:
                raise ValueError(f"ParallelDims.{name}={getattr(self, name)} must be >= 1")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def rank(self, pp: int, dp: int, tp: int) -> int:
        assert 0 <= pp < self.pp and 0 <= dp < self.dp and 0 <= tp < self.tp, (pp, dp, tp, self)
        return (pp * self.dp + dp) * self.tp + tp

    def coord(self, rank: int) -> Coord:
        assert 0 <= rank < self.world_size, (rank, self)
        tp = rank % self.tp
        dp = (rank // self.tp) % self.dp
        pp = rank // (self.tp * self.dp)
        return Coord(pp, dp, tp)

    def tp_groups(self) -> List[List[int]]:
        return [[self.rank(p, d, t) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)]

    def dp_groups(self) -> List[List[int]]:
        return [[self.rank(p, d, t) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]

    def pp_groups(self) -> List[List[int]]:
        return [[self.rank(p, d, t) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]

    def model_parallel_groups(self) -> List[List[int]]:
        """Ranks holding one full copy of the model (every stage, every TP shard)."""
        return [
            [self.rank(p, d, t) for p in range(self.pp) for t in range(self.tp)] for d in range(self.dp)
        ]

    def embedding_groups(self) -> List[List[int]]:
        """First and last stage of each pipeline (one rank when PP == 1)."""
        return [sorted({g[0], g[-1]}) for g in self.pp_groups()]

    def group_of(self, groups: List[List[int]], rank: int) -> List[int]:
        for g in groups:
            if rank in g:
                return g
        raise ValueError(f"rank {rank} is in no group of {self}")
