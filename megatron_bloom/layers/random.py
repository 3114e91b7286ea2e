"""Random streams for tensor parallelism.

Two kinds of dropout live in a TP model:
- on activations that every TP rank holds whole (after a row-parallel all-reduce): the masks must
  be the SAME on every TP rank, so they come from the default generator, seeded identically;
- on activations that are split across TP ranks (attention probabilities of each rank's heads):
  the masks must DIFFER per rank, or every rank would drop the same pattern of its own heads.
  Those draw from a tracked generator seeded with ``seed + 2718 + tp_rank`` (Megatron's offset).

``RNGStatesTracker.fork()`` swaps the tracked state in for the duration of a block and saves the
advanced state on exit. The tracker is an object owned by the model (no module-level global).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator

import torch
import torch.nn as nn

MODEL_PARALLEL_SEED_OFFSET = 2718


class RNGStatesTracker:
    def __init__(self) -> None:
        self.states: Dict[str, torch.Tensor] = {}

    def add(self, name: str, seed: int) -> None:
        if name in self.states:
            raise ValueError(f"RNG state {name} already exists")
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    def get_states(self) -> Dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states.items()}

    def set_states(self, states: Dict[str, torch.Tensor]) -> None:
        self.states = {k: v.clone() for k, v in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel") -> Iterator[None]:
        # CPU generator only: on GPU the same swap is done for the CUDA generator by the caller's
        # device (kept out of here while no GPU path exercises dropout).
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states[name])
        try:
            yield
        finally:
            self.states[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def model_parallel_tracker(seed: int, tp_rank: int) -> RNGStatesTracker:
    tracker = RNGStatesTracker()
    tracker.add("model-parallel", seed + MODEL_PARALLEL_SEED_OFFSET + tp_rank)
    return tracker


class TensorParallelDropout(nn.Module):
    """Dropout on a tensor split across TP ranks: each rank draws its own mask."""

    def __init__(self, p: float, tracker: RNGStatesTracker):
        super().__init__()
        self.p = p
        self.tracker = tracker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        with self.tracker.fork():
            return torch.nn.functional.dropout(x, self.p, training=True)
