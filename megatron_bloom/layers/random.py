"""Random streams for dropout under tensor and pipeline parallelism, as Megatron-DeepSpeed seeds them.

Two kinds of dropout live in a TP model:
- on activations that every TP rank holds whole (the embedding output, and attention and MLP
  outputs after their row-parallel all-reduce): the masks must be the SAME on every TP rank, so
  they come from the device's default generator, seeded identically on a stage's TP ranks;
- on activations split across TP ranks (the attention probabilities of each rank's heads): the
  masks must DIFFER per rank, or every rank would drop the same pattern of its own heads. Those
  draw from a tracked stream, entered with ``RNGStatesTracker.fork()``.

Seeds (Megatron-DeepSpeed's ``_set_random_seed`` and ``model_parallel_cuda_manual_seed``), for
``--seed S`` on pipeline stage ``pp`` and tensor rank ``tp``:

    default generator        S + 100 * pp                  (same on every TP and DP rank of a stage)
    "model-parallel" stream  S + 100 * pp + 2718 + tp      (one per TP rank and stage)

Worked example, S=42, TP=2, PP=2: stage 0 draws hidden dropout from seed 42 on both TP ranks and
attention dropout from 2760 (tp 0) and 2761 (tp 1); stage 1 from 142, and 2860 / 2861.

Every stream is the generator of the device the tensors live on (``default_generator``): the CPU
generator on CPU, the CUDA device's own on GPU, so CPU runs exercise the code a GPU runs. The
tracker is an object owned by the engine (no module-level global); its states are saved with every
checkpoint. ``recompute`` is activation checkpointing that also replays the tracked streams.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

MODEL_PARALLEL_RNG = "model-parallel"
MODEL_PARALLEL_SEED_OFFSET = 2718
"""Megatron's offset between the default seed and the tensor-parallel stream's."""
PIPELINE_SEED_STRIDE = 100
"""Megatron-DeepSpeed adds 100 x pipeline rank to the seed, so stages draw different masks."""

Device = torch.device | str


def default_generator(device: Device) -> torch.Generator:
    """The generator that random ops on ``device`` draw from (dropout, SDPA's dropout, rand)."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.default_generator
    module = torch.get_device_module(device)
    module.init()  # default_generators is filled by the device's lazy initialisation
    index = device.index if device.index is not None else module.current_device()
    return module.default_generators[index]


def dropout_seeds(seed: int, tp_rank: int, pp_rank: int) -> Tuple[int, int]:
    """(default-generator seed, model-parallel stream seed) of one rank; see the module docstring."""
    base = seed + PIPELINE_SEED_STRIDE * pp_rank
    return base, base + MODEL_PARALLEL_SEED_OFFSET + tp_rank


class RNGStatesTracker:
    """Named RNG states of one device's generator, swapped in by ``fork``.

    ``fork()`` puts the tracked state into the device's default generator for the duration of a
    block, stores the advanced state on exit and puts the previous one back.
    """

    def __init__(self, device: Device = "cpu") -> None:
        self.device = torch.device(device)
        self.states: Dict[str, torch.Tensor] = {}

    def add(self, name: str, seed: int) -> None:
        if name in self.states:
            raise ValueError(f"RNG state {name} already exists")
        # A generator of the same device type has the state layout the default one accepts.
        self.states[name] = torch.Generator(self.device).manual_seed(seed).get_state()

    def get_states(self) -> Dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states.items()}

    def set_states(self, states: Dict[str, torch.Tensor]) -> None:
        self.states = {k: v.clone() for k, v in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        generator = default_generator(self.device)
        saved = generator.get_state()
        generator.set_state(self.states[name])
        try:
            yield
        finally:
            self.states[name] = generator.get_state()
            generator.set_state(saved)


def model_parallel_tracker(seed: int, tp_rank: int, pp_rank: int = 0, device: Device = "cpu") -> RNGStatesTracker:
    """The tracker of one rank, its "model-parallel" stream seeded as Megatron-DeepSpeed seeds it."""
    tracker = RNGStatesTracker(device)
    tracker.add(MODEL_PARALLEL_RNG, dropout_seeds(seed, tp_rank, pp_rank)[1])
    return tracker


def seed_dropout_streams(tracker: RNGStatesTracker, seed: int, tp_rank: int, pp_rank: int) -> None:
    """Seed both dropout streams of a rank: the default generators and the tracker's stream.

    Called once the model is built (building reseeds per layer for the weights) and again when a
    resume at another layout cannot restore the saved streams rank for rank.
    """
    base, parallel = dropout_seeds(seed, tp_rank, pp_rank)
    torch.manual_seed(base)  # the CPU generator and every accelerator device's
    tracker.states = {}
    tracker.add(MODEL_PARALLEL_RNG, parallel)


def trackers_in(module: nn.Module) -> Tuple[RNGStatesTracker, ...]:
    """The distinct trackers that modules inside ``module`` draw from (``rng_tracker`` attributes)."""
    found: Dict[int, RNGStatesTracker] = {}
    for m in module.modules():
        tracker = getattr(m, "rng_tracker", None)
        if tracker is not None:
            found[id(tracker)] = tracker
    return tuple(found.values())


def _replay(trackers: Sequence[RNGStatesTracker]):
    """``context_fn`` for torch's checkpoint: the recompute starts from the forward's tracked states."""
    at_forward = [t.get_states() for t in trackers]

    @contextlib.contextmanager
    def replaying() -> Iterator[None]:
        current = [t.get_states() for t in trackers]
        for t, states in zip(trackers, at_forward):
            t.set_states(states)
        try:
            yield
        finally:
            for t, states in zip(trackers, current):
                t.set_states(states)

    return contextlib.nullcontext(), replaying()


def recompute(function: Callable, *args, trackers: Iterable[RNGStatesTracker] = ()):
    """Activation checkpointing whose backward recompute draws the forward's dropout masks.

    torch's non-reentrant checkpoint restores the default generators (CPU and the inputs' device);
    the tracked streams it does not know, so they are put back to their forward-time states for the
    recompute and advanced as before afterwards (what Megatron-DeepSpeed's ``CheckpointFunction``
    does with its CUDA RNG tracker).
    """
    trackers = tuple(trackers)
    if not trackers:
        return checkpoint(function, *args, use_reentrant=False)
    return checkpoint(function, *args, use_reentrant=False, context_fn=lambda: _replay(trackers))


def dropout_rng(tracker: Optional[RNGStatesTracker]):
    """The context a dropout inside the TP region draws in: the tracker's fork, or nothing."""
    return tracker.fork() if tracker is not None else contextlib.nullcontext()
