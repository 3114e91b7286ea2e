"""Per-group losses (e.g. per language and per task of a finetuning mixture), summed over every rank."""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.distributed as dist


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
        self.sums = [torch.zeros(2, n, dtype=torch.float64) for n in self.sizes]

    def add(self, losses: torch.Tensor, weights: torch.Tensor, groups: Sequence[torch.Tensor]) -> None:
        w = weights.reshape(-1).detach().double().cpu()
        lw = losses.reshape(-1).detach().double().cpu() * w
        for k, ids in enumerate(groups[: len(self.sizes)]):
            n = self.sizes[k]
            ids = ids.reshape(-1).long().cpu().clamp(0, max(n - 1, 0))
            self.sums[k][0] += torch.bincount(ids, weights=lw, minlength=n)[:n]
            self.sums[k][1] += torch.bincount(ids, weights=w, minlength=n)[:n]

    def reduce(self, contributes: bool, device) -> List[Dict[int, float]]:
        """[{group id: mean}] per grouping, over all ranks; groups with no weight are left out."""
        flat = torch.cat([s.reshape(-1) for s in self.sums]) if self.sums else torch.zeros(0, dtype=torch.float64)
        if not contributes:
            flat = torch.zeros_like(flat)
        flat = flat.to(device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flat)
        flat = flat.cpu()
        out, offset = [], 0
        for n in self.sizes:
            sums, weights = flat[offset:offset + n], flat[offset + n:offset + 2 * n]
            offset += 2 * n
            out.append({i: float(sums[i] / weights[i]) for i in range(n) if weights[i] > 0})
        self.reset()
        return out
