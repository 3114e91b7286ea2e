"""Start and stop the distributed runtime for one process of a job."""
from __future__ import annotations

import os
import random
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from .launch_env import LaunchEnv, detect_launch_env
from .parallel_state import ParallelState
from .topology import ParallelDims


def pick_backend(requested: Optional[str] = None) -> str:
    """NCCL on GPU, gloo on CPU; the code paths are otherwise the same."""
    if requested:
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(
    tp: int,
    pp: int,
    backend: Optional[str] = None,
    timeout_minutes: float = 10.0,
    launch: Optional[LaunchEnv] = None,
) -> ParallelState:
    """Initialize the default process group from the launcher's env and build every TP/PP/DP group.

    ``timeout_minutes`` bounds every collective: when a rank dies the others raise after this long
    instead of hanging the allocation.
    """
    launch = launch or detect_launch_env()
    backend = pick_backend(backend)
    if launch.world_size % (tp * pp) != 0:
        raise ValueError(f"world size {launch.world_size} is not divisible by TP x PP = {tp * pp}")
    dims = ParallelDims(tp=tp, pp=pp, dp=launch.world_size // (tp * pp))
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank)
        device = torch.device("cuda", launch.local_rank)
    else:
        device = torch.device("cpu")
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
        )
    return ParallelState.build(dims, device, timeout=timeout)


def shutdown() -> None:
    """Destroy the default group; safe to call on every exit path, twice, or when never started."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch identically on every rank.

    Every rank draws the same full-size initial weights and keeps its own shard of them, so a
    model's starting point does not depend on the layout. Dropout streams that must differ per
    tensor-parallel rank come from the model-parallel RNG tracker, not from this seed.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
