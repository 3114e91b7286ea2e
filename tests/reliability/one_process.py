"""The environment of a tool or entry point run as one process by these tests."""
import os
from typing import Dict


def env() -> Dict[str, str]:
    """DeepSpeed on CPU, one thread, no Hub, and none of a launcher's variables (the tests may run under one)."""
    e = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        e.pop(k, None)
    return e
