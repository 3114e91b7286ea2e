"""Per-group losses (e.g. per language and per task of a finetuning mixture), summed over every rank."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_bloom.distributed.collectives import all_reduce_, group_device


class GroupLossMeter:
    """Sums of weighted token losses and of weights per group id, for each grouping (language, task).

    The finetuning loss (training/losses.py) feeds it every micro-batch on the last pipeline stage;
    ``reduce`` adds up every rank's sums (a collective: every rank calls it at the same points) and
    returns per-group means over everything seen: token means, or with --norm-target-loss means over
    targets (each target's tokens weigh 1/its length; under --loss-normalization micro-batch a
    target is a run of loss-bearing positions, see training/data.run_normalized). Both
    --loss-normalization modes give the same group means: they differ only in how a step's loss
    divides, which the meter does not use.
    """

    def __init__(self, sizes: Sequence[int]):
        self.sizes = list(sizes)
        self.reset()

    def reset(self) -> None:
        self.sums: Optional[List[torch.Tensor]] = None  # [2, n] per grouping, on the losses' device

    def add(self, losses: torch.Tensor, weights: torch.Tensor, groups: Sequence[torch.Tensor]) -> None:
        """Accumulate one micro-batch where its tensors are: no host copy or sync inside the
        pipeline schedule (``index_add_``, unlike ``bincount``, needs no output size from the host)."""
        w = weights.reshape(-1).detach().double()
        lw = losses.reshape(-1).detach().double() * w
        if self.sums is None:
            self.sums = [torch.zeros(2, n, dtype=torch.float64, device=w.device) for n in self.sizes]
        for k, ids in enumerate(groups[: len(self.sizes)]):
            n = self.sizes[k]
            ids = ids.reshape(-1).to(device=w.device, dtype=torch.long).clamp(0, max(n - 1, 0))
            self.sums[k][0].index_add_(0, ids, lw)
            self.sums[k][1].index_add_(0, ids, w)

    def reduce(self, contributes: bool) -> List[Dict[int, float]]:
        """[{group id: mean}] per grouping, over all ranks; groups with no weight are left out.

        A collective when a process group exists: every rank calls it at the same points, and
        ranks that saw no micro-batch (``contributes`` False: middle pipeline stages) add zeros."""
        total = 2 * sum(self.sizes)
        mine = torch.cat([s.reshape(-1) for s in self.sums]) if contributes and self.sums else None
        if dist.is_initialized() and dist.get_world_size() > 1:
            device = group_device()
            flat = mine.to(device) if mine is not None else torch.zeros(total, dtype=torch.float64, device=device)
            values = all_reduce_(flat).tolist()  # the one host copy, at the log interval
        else:
            values = mine.tolist() if mine is not None else [0.0] * total
        out, offset = [], 0
        for n in self.sizes:
            sums, weights = values[offset:offset + n], values[offset + n:offset + 2 * n]
            offset += 2 * n
            out.append({i: sums[i] / weights[i] for i in range(n) if weights[i] > 0})
        self.reset()
        return out
