"""Process groups of one rank, created once and passed explicitly to everything that communicates.

No module keeps a global group: a layer receives the group it uses as an argument (a global that
is read in the wrong place gives silently wrong gradients).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, List, Optional

import torch
import torch.distributed as dist

from .topology import Coord, ParallelDims


@dataclass
class ParallelState:
    dims: ParallelDims
    rank: int
    device: torch.device
    backend: str
    tp_group: Any = None
    dp_group: Any = None
    pp_group: Any = None
    mp_group: Any = None
    embedding_group: Any = None
    tp_ranks: List[int] = field(default_factory=lambda: [0])
    dp_ranks: List[int] = field(default_factory=lambda: [0])
    pp_ranks: List[int] = field(default_factory=lambda: [0])
    embedding_ranks: List[int] = field(default_factory=lambda: [0])

    def __post_init__(self) -> None:
        """Derives ``coord``, ``tp_rank``, ``dp_rank``, ``pp_rank``, ``tp_size``, ``is_first_stage`` and
        ``is_last_stage`` once: the rank and the grid never change for the life of the process."""
        self.coord: Coord = self.dims.coord(self.rank)
        self.tp_rank, self.dp_rank, self.pp_rank = self.coord.tp, self.coord.dp, self.coord.pp
        self.tp_size = self.dims.tp
        self.is_first_stage, self.is_last_stage = self.pp_rank == 0, self.pp_rank == self.dims.pp - 1

    @classmethod
    def single(cls, device: Optional[torch.device] = None) -> "ParallelState":
        """One process, no process group: every collective is the identity."""
        return cls(ParallelDims(1, 1, 1), 0, device or torch.device("cpu"), backend="none")

    @classmethod
    def build(cls, dims: ParallelDims, device: torch.device, timeout: Optional[timedelta] = None) -> "ParallelState":
        """Create every group of ``dims`` (the default group must exist already).

        ``new_group`` is collective over the whole world: every rank creates every group, in the
        same order, and keeps the ones it belongs to.
        """
        if dist.get_world_size() != dims.world_size:
            raise ValueError(
                f"world size {dist.get_world_size()} does not match TP x PP x DP = {dims.tp} x {dims.pp} x {dims.dp}"
            )
        rank = dist.get_rank()
        state = cls(dims, rank, device, backend=dist.get_backend())
        kinds = (
            ("tp", dims.tp_groups()),
            ("dp", dims.dp_groups()),
            ("pp", dims.pp_groups()),
            ("mp", dims.model_parallel_groups()),
            ("embedding", dims.embedding_groups()),
        )
        for kind, groups in kinds:
            for ranks in groups:
                group = dist.new_group(ranks, timeout=timeout)
                if rank in ranks:
                    setattr(state, f"{kind}_group", group)
                    if kind != "mp":
                        setattr(state, f"{kind}_ranks", list(ranks))
        return state
