"""Rank topology, launcher environment, process groups."""
from .hostlist import expand_hostlist
from .init import init_distributed, pick_backend, set_seed, shutdown
from .launch_env import LaunchEnv, detect_launch_env, free_port, world_size_from_env
from .parallel_state import ParallelState
from .topology import Coord, ParallelDims

__all__ = [
    "Coord",
    "LaunchEnv",
    "ParallelDims",
    "ParallelState",
    "detect_launch_env",
    "expand_hostlist",
    "free_port",
    "init_distributed",
    "pick_backend",
    "set_seed",
    "shutdown",
    "world_size_from_env",
]
