"""Start and stop the distributed runtime for one process of a job.

Two guards for when a job loses a process:

* torchrun starts every rank in a session of its own, so killing the agent (its process group,
  an OOM kill) leaves the ranks running as orphans, still training and saving into the directory
  that the next (requeued) job resumes from. Under torchrun each rank asks the kernel for a
  SIGKILL when its agent dies.
* A rank whose collective fails because a peer died or hung ends with a long library traceback
  ("Connection reset by peer", a timeout) that says nothing about which rank was lost. Its last
  line says which of the two happened and where to find the rank.
"""
from __future__ import annotations

import gc
import os
import random
import signal
import sys
import warnings
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from .collectives import barrier
from .launch_env import LaunchEnv, detect_launch_env
from .parallel_state import ParallelState
from .topology import ParallelDims


def pick_backend(requested: Optional[str] = None) -> str:
    """NCCL on GPU, gloo on CPU; the code paths are otherwise the same."""
    if requested:
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def run_device(backend: str, local_rank: int) -> torch.device:
    """The device a rank computes on: the CPU under gloo, else accelerator ``local_rank`` (NCCL: CUDA)."""
    if backend == "gloo":
        return torch.device("cpu")
    accelerator = torch.accelerator.current_accelerator()  # None on a machine without one
    return torch.device("cuda" if backend == "nccl" or accelerator is None else accelerator.type, local_rank)


def init_distributed(
    tp: int,
    pp: int,
    backend: Optional[str] = None,
    timeout_minutes: float = 10.0,
    launch: Optional[LaunchEnv] = None,
) -> ParallelState:
    """Initialize the default process group from the launcher's env and build every TP/PP/DP group.

    ``timeout_minutes`` bounds every collective, also in the groups DeepSpeed creates later: when
    a rank dies or hangs the others raise after this long instead of hanging the allocation.
    """
    launch = launch or detect_launch_env()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        stop_with_parent()
    if not flush_denormals() and launch.rank == 0:
        warnings.warn("denormal floats are flushed to zero on the main thread only: torch's worker threads "
                      "started before init_distributed (CPU attention with ALiBi runs up to 1.6x slower)")
    backend = pick_backend(backend)
    if launch.world_size % (tp * pp) != 0:
        raise ValueError(f"world size {launch.world_size} is not divisible by TP x PP = {tp * pp}")
    dims = ParallelDims(tp=tp, pp=pp, dp=launch.world_size // (tp * pp))
    device = run_device(backend, launch.local_rank)
    if device.type != "cpu":
        torch.accelerator.set_device_index(device.index)  # NCCL and every cuda call use it from here
    timeout = timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        # Other libraries (DeepSpeed, torch's env:// init) read these names.
        os.environ.setdefault("MASTER_ADDR", launch.master_addr)
        os.environ.setdefault("MASTER_PORT", str(launch.master_port))
        os.environ.setdefault("RANK", str(launch.rank))
        os.environ.setdefault("WORLD_SIZE", str(launch.world_size))
        os.environ.setdefault("LOCAL_RANK", str(launch.local_rank))
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timeout,
            # On GPU: NCCL builds its communicator now, bound to this rank's device, and can split
            # it for the TP/PP/DP groups instead of creating one per group lazily at first use.
            device_id=None if device.type == "cpu" else device,
        )
        # DeepSpeed builds its groups (data-parallel for ZeRO, pipeline) with dist.new_group(ranks),
        # which takes torch's default timeout (30 min on gloo, 10 on NCCL), not ours: a rank that
        # hung (not died) stalled the others in a ZeRO reduction far beyond the configured bound.
        dist.distributed_c10d.default_pg_timeout = timeout
        dist.distributed_c10d.default_pg_nccl_timeout = timeout
        _explain_lost_peers(launch.rank, timeout_minutes)
    return ParallelState.build(dims, device, timeout=timeout)


def flush_denormals() -> bool:
    """Treat denormal floats as zero in CPU math (FTZ/DAZ) on this thread and torch's worker threads.

    BLOOM's ALiBi bias makes many attention scores very negative; their exp underflows to
    denormals, which x86 computes far more slowly (``python benchmarks/denormals.py`` times SDPA
    with the bias, with a plain causal mask and flushed; the README quotes it). The values lost
    are below 1e-38. Worker threads copy the setting when
    they are created, so this must run before torch's first parallel op. Returns whether the
    flush holds on every thread that computed a probe (False on a CPU without it).
    """
    return torch.set_flush_denormal(True) and surviving_denormals() == 0


def surviving_denormals(n: int = 1 << 20) -> int:
    """How many of ``n`` products that should be denormal (1e-30 * 1e-10) are not flushed to zero.

    An elementwise op this large is split across torch's worker threads, so 0 means every thread
    flushes; ``n=1`` probes only the calling thread.
    """
    return int((torch.full((n,), 1e-30) * 1e-10).count_nonzero())


def stop_with_parent() -> bool:
    """Have the kernel SIGKILL this process when its parent (the torchrun agent) dies; Linux only.

    Immediate and without a save: the job was killed, and a rank that outlived it must not write
    into the checkpoint directory a requeued job may already be reading. (A kernel request, not a
    watching thread: a Python daemon thread alive at exit made some ranks abort in C++ teardown.)
    Returns whether the request is in place.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    pr_set_pdeathsig = 1  # <linux/prctl.h>
    parent = os.getppid()
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the agent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)
    return True


# What gloo and NCCL say when a peer process is gone, or did not answer within the timeout.
DEAD_PEER_MESSAGES = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                      "NCCL communicator was aborted")
SILENT_PEER_MESSAGES = ("Timed out", "timed out", "Watchdog caught collective operation timeout")


def lost_peer_hint(exc: BaseException, rank: int, timeout_minutes: float) -> str | None:
    """The line to end a traceback with when ``exc`` is a collective that lost a peer, else None."""
    text = str(exc)
    if not isinstance(exc, RuntimeError):
        return None
    if any(m in text for m in DEAD_PEER_MESSAGES):
        return (f"error: rank {rank}: another rank died during a collective; torchrun's report names it "
                f"('Root Cause', on the node that lost it) and its own log says why")
    if any(m in text for m in SILENT_PEER_MESSAGES):
        return (f"error: rank {rank}: another rank did not answer a collective within "
                f"--distributed-timeout-minutes {timeout_minutes:g}; it hung or is stuck elsewhere: look for the "
                f"rank whose log does not end in an error like this one")
    return None


def _explain_lost_peers(rank: int, timeout_minutes: float) -> None:
    """Wrap ``sys.excepthook`` (after torch's own, which prefixes [rankN]) to add ``lost_peer_hint``."""
    previous = sys.excepthook

    def hook(kind, exc, tb) -> None:
        previous(kind, exc, tb)
        hint = lost_peer_hint(exc, rank, timeout_minutes)
        if hint:
            print(hint, file=sys.stderr, flush=True)

    sys.excepthook = hook


def shutdown(together: bool = False) -> None:
    """Destroy the default group; safe to call on every exit path, twice, or when never started.

    ``together=True`` (the normal end of a run, reached by every rank) first waits at a barrier.
    Without it, a DeepSpeed run whose ranks left one by one sometimes aborted at interpreter exit
    ("terminate called without an active exception", SIGABRT) after all its work was done.
    Error paths skip the barrier: the peers may be gone. Garbage is collected last, so groups
    still held by DeepSpeed's reference cycles go down now rather than during finalization.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if together:
        try:
            barrier()
        except RuntimeError:  # a peer left first; tearing down is still right
            pass
    dist.destroy_process_group()
    gc.collect()


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch identically on every rank.

    Every rank draws the same full-size initial weights and keeps its own shard of them, so a
    model's starting point does not depend on the layout. Dropout streams that must differ per
    tensor-parallel rank come from the model-parallel RNG tracker, not from this seed.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
