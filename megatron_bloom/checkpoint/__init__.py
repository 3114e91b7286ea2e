"""Checkpoints: save/commit/load in Megatron-DeepSpeed's layout, layout changes on resume, and
conversion to and from transformers folders and original Megatron-DeepSpeed BLOOM checkpoints.
File names, the atomic writer and tokenizer-file copying live in ``files``."""
from .files import tag_for
from .manager import CheckpointInfo, check_compatible, find_checkpoint, load_rng, save_checkpoint
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
# hf.py (transformers folders), native.py (weights-only native checkpoints, merged reads) and
# megatron_deepspeed.py import transformers/safetensors: import them from their modules.
