"""Who am I in the job? Read from the environment torchrun, the deepspeed launcher or srun set.

Pure functions of an environment mapping, so every launcher's variables are testable without
starting processes.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Mapping, Optional

from ..errors import UserError
from .hostlist import expand_hostlist

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str
    """'torchrun' (also the deepspeed launcher: both set RANK/WORLD_SIZE), 'slurm' or 'single'."""


def free_port() -> int:
    """A TCP port that was free a moment ago on localhost."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect_launch_env(environ: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """Rank, world size and rendezvous address from the launcher's variables.

    RANK/WORLD_SIZE win over SLURM_*: under `srun torchrun ...` (one launcher task per node, the
    layout BLOOM used) SLURM_PROCID is the node index, while torchrun's RANK is the process's rank.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        master = env.get("MASTER_ADDR") or (expand_hostlist(nodelist)[0] if nodelist else "127.0.0.1")
        # A per-job port keeps two jobs sharing a node from colliding on the default port.
        default_port = 10000 + int(env.get("SLURM_JOB_ID", "0")) % 50000 if "SLURM_JOB_ID" in env else DEFAULT_MASTER_PORT
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            master_addr=master,
            master_port=int(env.get("MASTER_PORT", default_port)),
            launcher="slurm",
        )
    if int(env.get("WORLD_SIZE", "1")) != 1:
        # A process cannot know its rank from WORLD_SIZE alone; guessing rank 0 would start a
        # rendezvous that waits for peers nobody launched.
        raise UserError(f"WORLD_SIZE={env['WORLD_SIZE']} is set but RANK is not; launch the ranks with torchrun "
                        f"(which sets both), or set RANK (and MASTER_ADDR, MASTER_PORT) for each process")
    return LaunchEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or free_port(), "single")


def world_size_from_env(environ: Optional[Mapping[str, str]] = None) -> int:
    """World size without starting anything (for validating the config first).

    A WORLD_SIZE without RANK counts too: ``WORLD_SIZE=3 python launch/pretrain.py ...`` checks the
    configuration for 3 ranks (a layout error is reported as such) before ``detect_launch_env``
    refuses to start a process that does not know its rank.
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env and "RANK" not in env and not ("SLURM_PROCID" in env and "SLURM_NTASKS" in env):
        return int(env["WORLD_SIZE"])
    return detect_launch_env(environ).world_size
