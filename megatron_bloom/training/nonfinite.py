"""NaN/Inf gradients without loss scaling (fp32, bf16): all ranks agree, then skip the update or stop.

fp16 needs none of this: DeepSpeed's dynamic loss scaling skips an overflowing step on every rank
(and lowers the scale), which the engine reports as ``StepResult.skipped``. Without loss scaling,
DeepSpeed applies a NaN update under ZeRO-0 and bf16 and every weight becomes NaN. So
(``training.nan_policy``, ``--nan-policy``):

1. A hook on every parameter sees each micro-batch's gradient before DeepSpeed accumulates,
   reduces or partitions it, and records whether it was finite. Checking there, not after
   backward, keeps parameter names: ZeRO-1/2/3 move reduced gradients into flat partitions. A
   non-finite local gradient makes the reduced one non-finite, and vice versa (short of an
   overflow in the reduction itself).
2. Right before the optimizer step (DeepSpeed's ``_take_model_step``, which the pipeline engine
   and the plain engine both call exactly once per step, on every rank) one all-reduce (MIN over
   "my rank if I saw one, else world size") tells every rank whether, and where first, a
   non-finite gradient was seen. Every rank takes the same branch, so none waits for the others.
3. ``skip``: our torch optimizer's ``step`` does nothing for this one call while DeepSpeed's
   bookkeeping runs as usual (ZeRO/bf16 wrappers copy the unchanged fp32 masters back, gradients
   are zeroed): weights and Adam moments stay exactly as they were. ``stop``: every rank raises
   ``NonFiniteGradients`` before anything is applied (one line, exit code 2).

Test-only fault injection (never set it in a real run): ``MEGATRON_BLOOM_TEST_NONFINITE_GRAD=
ITERATION:RANK:PARAMETER[:nan|inf]`` replaces the gradient of PARAMETER (a full name such as
``transformer.h.1.mlp.dense_h_to_4h.weight``) on global rank RANK with NaN (default) or Inf in
every micro-batch of ITERATION, upstream of the check and of DeepSpeed (also under fp16).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_bloom.distributed.collectives import all_reduce_values, broadcast_object
from megatron_bloom.errors import RunStopped, UserError

INJECT_ENV = "MEGATRON_BLOOM_TEST_NONFINITE_GRAD"


def gradient_sum(grad: torch.Tensor) -> torch.Tensor:
    """The sum of ``grad``, which is NaN or infinite when any element is (a NaN, or infinities of
    either sign, propagate): the finiteness check of DeepSpeed's loss scaler, one read of the
    gradient and no temporary. ``isfinite(grad).all()`` would hold |grad| and two masks of its
    size at once (770 MB per rank on BLOOM's 250,880-row embedding at TP 2, fp32). The sum is
    accumulated in float32 (bf16 and fp32 already are; fp16 is asked to, its range ends at 65,504),
    so a finite gradient reads as infinite only if its elements sum past 3.4e38, where Adam's squares
    of them would have overflowed anyway."""
    return grad.sum(dtype=torch.float32) if grad.dtype == torch.float16 else grad.sum()


class NonFiniteGradients(RunStopped):
    """``--nan-policy stop`` found a NaN/Inf gradient; no update was applied. One line, exit code 2."""


@dataclass(frozen=True)
class Injection:
    """A test's request to poison one parameter's gradient on one rank at one iteration."""

    iteration: int
    rank: int
    parameter: str
    value: float

    @classmethod
    def from_env(cls) -> Optional["Injection"]:
        text = os.environ.get(INJECT_ENV)
        if not text:
            return None
        parts = text.split(":")
        kind = parts[3] if len(parts) == 4 else "nan"
        if len(parts) not in (3, 4) or not (parts[0].isdigit() and parts[1].isdigit()) or kind not in ("nan", "inf"):
            raise UserError(f"{INJECT_ENV}='{text}' is not ITERATION:RANK:PARAMETER[:nan|inf]")
        return cls(int(parts[0]), int(parts[1]), parts[2], float(kind))


@dataclass(frozen=True)
class NonFinite:
    """Where the agreed non-finite gradient was seen first (lowest rank, first parameter in forward order)."""

    rank: int
    parameter: str

    def __str__(self) -> str:
        return f"first on rank {self.rank} in {self.parameter}"


class GradientGuard:
    """Per-parameter finiteness flags for the current step, and the collective verdict over all ranks.

    ``named_parameters`` is this rank's parameters in forward order, each once, with the names
    a user knows (``transformer.h.3.self_attention.query_key_value.weight``).
    """

    def __init__(self, named_parameters: Sequence[Tuple[str, torch.nn.Parameter]], rank: int, device: torch.device,
                 check: bool, injection: Optional[Injection] = None):
        self.names = [name for name, _ in named_parameters]
        self.rank, self.device, self.check = rank, device, check
        self.iteration = 0
        """The iteration (1-based) whose gradients the hooks are seeing; set by ``begin_step``."""
        self._bad: List[Optional[torch.Tensor]] = [None] * len(self.names)
        self._poison: Optional[int] = None
        if injection is not None and injection.rank == rank:
            if injection.parameter not in self.names:
                raise UserError(f"{INJECT_ENV}: rank {rank} holds no parameter '{injection.parameter}'; "
                                f"it holds {', '.join(self.names)}")
            self._poison = self.names.index(injection.parameter)
        self.injection = injection
        if check or self._poison is not None:
            for i, (_, p) in enumerate(named_parameters):
                if p.requires_grad:
                    p.register_hook(self._hook(i))

    def _hook(self, index: int):
        def hook(grad: torch.Tensor) -> Optional[torch.Tensor]:
            if index == self._poison and self.iteration == self.injection.iteration:
                grad = torch.full_like(grad, self.injection.value)
            if self.check:
                bad = ~torch.isfinite(gradient_sum(grad))
                # A 0-dim tensor, no host sync here: the verdict reads all of them once per step.
                self._bad[index] = bad if self._bad[index] is None else self._bad[index] | bad
            return grad

        return hook

    def begin_step(self, iteration: Optional[int]) -> None:
        """Before the step's first forward: ``iteration`` as the trainer counts it (None: count here)."""
        self.iteration = self.iteration + 1 if iteration is None else iteration
        self._bad = [None] * len(self.names)

    def _first_local(self) -> Optional[int]:
        flags = [(i, f) for i, f in enumerate(self._bad) if f is not None]
        if not flags:
            return None
        bad = torch.stack([f for _, f in flags])
        if not bool(bad.any()):
            return None
        return flags[int(bad.nonzero()[0, 0])][0]

    def agree(self) -> Optional[NonFinite]:
        """Collective over the whole world, once per step on every rank: the first non-finite gradient, if any."""
        if not self.check:
            return None
        first = self._first_local()
        world = dist.get_world_size()
        src = int(all_reduce_values([self.rank if first is not None else world], op="min")[0])
        if src == world:
            return None
        return NonFinite(src, broadcast_object(self.names[first] if src == self.rank else None, src=src))


@contextlib.contextmanager
def optimizer_step_skipped(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """``optimizer.step()`` does nothing inside: DeepSpeed runs its step bookkeeping, the update is not applied."""
    optimizer.step = lambda *args, **kwargs: None  # shadows the class's step for this instance only
    try:
        yield
    finally:
        del optimizer.step


def parameters_in_forward_order(engine) -> List[Tuple[str, torch.nn.Parameter]]:
    """(full name, parameter) of every parameter this rank of ``engine`` (a BloomEngine) holds, once each."""
    from megatron_bloom.checkpoint.native import _local_layers, full_keys

    out, seen = [], set()
    for idx, module in _local_layers(engine):
        local = {name: p for name, p in module.named_parameters() if id(p) not in seen}
        for name, p in full_keys(engine.cfg.model, idx, local).items():
            seen.add(id(p))
            out.append((name, p))
    # Anything the layer walk missed still gets checked, under the module's own name.
    out += [(name, p) for name, p in engine.module.named_parameters() if id(p) not in seen]
    return out
