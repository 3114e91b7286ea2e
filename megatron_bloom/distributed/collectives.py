"""Every collective of the package, on the device its group's backend serves.

torch's NCCL backend takes CUDA tensors only ("No backend type associated with device type cpu"),
gloo takes CPU tensors; a collective handed a tensor on the other device fails on the GPU cluster
and nowhere else, since CPU runs use gloo with CPU tensors throughout. So no module calls
``torch.distributed``'s collectives itself (``tests/unit/test_collectives.py`` checks the source):

* values (flags, counters, a loss for the log) go in and come out as Python numbers; the helper
  builds the tensor on ``group_device(group)`` and does the one host copy;
* tensors (activations, gradients, logits) are checked: one on another device than the group's
  raises ``DeviceMismatch`` naming the collective, on CPU as on GPU.
"""
from __future__ import annotations

import os
import secrets
import time
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_bloom.atomic import atomic_write_text
from megatron_bloom.errors import UserError

Group = Optional[dist.ProcessGroup]

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class DeviceMismatch(RuntimeError):
    """A collective was handed a tensor on another device than its group's backend serves."""


def group_device(group: Group = None) -> torch.device:
    """The device a group's tensors live on: the CPU for gloo, this rank's accelerator otherwise
    (NCCL: the CUDA device ``init_distributed`` set current)."""
    backend = str(dist.get_backend(group)).lower()
    if backend == "gloo":
        return torch.device("cpu")
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is None:
        raise DeviceMismatch(f"process group backend '{backend}' needs an accelerator, and this process has none")
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


def check_device(tensor: torch.Tensor, group: Group, op: str) -> None:
    expected = group_device(group)
    if tensor.device.type != expected.type or (expected.index is not None and tensor.device.index != expected.index):
        raise DeviceMismatch(f"{op}: a tensor on {tensor.device}, but the '{dist.get_backend(group)}' group works on "
                             f"{expected}; build it on the group's device (distributed/collectives.py)")


# ---- tensors: checked, in place ----------------------------------------------------------------------------


def all_reduce_(tensor: torch.Tensor, op: str = "sum", group: Group = None) -> torch.Tensor:
    """In-place all-reduce (``op``: sum, max, min) of a tensor on the group's device."""
    check_device(tensor, group, "all_reduce")
    dist.all_reduce(tensor, op=_OPS[op], group=group)
    return tensor


def all_gather_into(parts: List[torch.Tensor], tensor: torch.Tensor, group: Group = None) -> List[torch.Tensor]:
    """``parts[r]`` = rank r's ``tensor`` (all on the group's device)."""
    check_device(tensor, group, "all_gather")
    for part in parts:
        check_device(part, group, "all_gather")
    dist.all_gather(parts, tensor, group=group)
    return parts


def broadcast_(tensor: torch.Tensor, src: int = 0, group: Group = None) -> torch.Tensor:
    """In-place broadcast from global rank ``src``."""
    check_device(tensor, group, "broadcast")
    dist.broadcast(tensor, src=src, group=group)
    return tensor


# ---- values: numbers in, numbers out ------------------------------------------------------------------------


def _values_tensor(values: Sequence[float], group: Group) -> torch.Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float64, device=group_device(group))


def all_reduce_values(values: Sequence[float], op: str = "sum", group: Group = None) -> List[float]:
    """The element-wise ``op`` of ``values`` over the group (one collective, one host copy)."""
    return all_reduce_(_values_tensor(values, group), op, group).tolist()


def broadcast_values(values: Sequence[float], src: int = 0, group: Group = None) -> List[float]:
    """Global rank ``src``'s ``values`` on every rank (every rank passes as many)."""
    return broadcast_(_values_tensor(values, group), src, group).tolist()


def all_gather_values(values: Sequence[float], group: Group = None) -> List[List[float]]:
    """Every rank's ``values``, by rank of the group (every rank passes as many)."""
    mine = _values_tensor(values, group)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    return [p.tolist() for p in all_gather_into(parts, mine, group)]


# ---- objects and synchronisation -------------------------------------------------------------------------------


def all_gather_object(obj: Any, group: Group = None) -> List[Any]:
    """Every rank's picklable ``obj``, by rank of the group (serialized on the group's device)."""
    out: List[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, src: int = 0, group: Group = None) -> Any:
    """Global rank ``src``'s picklable ``obj`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group, device=group_device(group))
    return box[0]


def barrier(group: Group = None) -> None:
    """Wait for every rank of the group (on NCCL, on this rank's own device)."""
    index = group_device(group).index  # None on the CPU
    dist.barrier(group=group, device_ids=None if index is None else [index])


# ---- work on rank 0 that may outlast any collective timeout -------------------------------------------------


def on_rank0_while_others_poll(work: Callable[[], None], done: Callable[[], bool], failure_file: str,
                               what: str, poll_seconds: float = 2.0) -> None:
    """Rank 0 runs ``work`` (a conversion: minutes to hours at BLOOM-176B's 2.3 TB) while the other
    ranks poll the shared file system for ``done()``, not wait in a barrier: any collective gives
    up after the process group's timeout, and a requeued job would start the work over.

    A failure of ``work`` on rank 0 is written to ``failure_file`` (with a token of this call, so a
    stale file of an earlier job is never taken for it) and raised on every rank as a UserError.
    A collective: every rank of the default group calls it.
    """
    token = broadcast_object(secrets.token_hex(8) if dist.get_rank() == 0 else None)
    mine = f"{failure_file}.{token}"
    if dist.get_rank() == 0:
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - every failure must reach the waiting ranks
            if dist.get_world_size() > 1:
                _report_failure(mine, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise
        return
    while not done():
        if os.path.exists(mine):
            with open(mine, encoding="utf-8") as fh:
                raise UserError(f"{what} failed on rank 0: {fh.read().strip()}")
        time.sleep(poll_seconds)


def _report_failure(path: str, message: str) -> None:
    """Write rank 0's failure for the waiting ranks (whole, never half-read); if even that fails,
    rank 0's own error ends the job and the launcher stops the waiting ranks."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        atomic_write_text(path, message)
    except OSError:
        pass
