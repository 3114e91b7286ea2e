"""Checkpoints: save/commit/load in Megatron-DeepSpeed's layout, and layout changes on resume."""
from .manager import CheckpointInfo, check_compatible, find_checkpoint, load_rng, save_checkpoint, tag_for
from .universal import convert_to_universal, universal_checkpoint_info

__all__ = [
    "CheckpointInfo",
    "check_compatible",
    "convert_to_universal",
    "find_checkpoint",
    "load_rng",
    "save_checkpoint",
    "tag_for",
    "universal_checkpoint_info",
]
