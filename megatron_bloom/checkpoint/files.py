"""Names of the files in a checkpoint folder, the one atomic writer, and tokenizer-file copying.

Every checkpoint module (training saves, weights-only conversions, readers of original
Megatron-DeepSpeed checkpoints) takes its file names from here, so a name is spelled once::

    <dir>/latest                                  LATEST: the tag of the newest complete checkpoint
    <dir>/tokenizer/                              TOKENIZER_DIR: the run's tokenizer files (a conversion's, a training run's)
    <dir>/global_step12/                          tag_for(12), matched by TAG_RE
        layer_XX-model_YY-model_states.pt         layer_file(XX, YY), matched by LAYER_FILE_RE
        mp_rank_YY_model_states.pt                mp_rank_file(YY), matched by MP_RANK_FILE_RE
        megatron_bloom.pt                         STATE_FILE
        rng/rank_00003.pt                         rng_file(3) under RNG_DIR
        complete                                  COMPLETE: written once every rank's files are on disk

This module imports neither ``native`` nor ``hf``, so both import it without a cycle.
"""
from __future__ import annotations

import filecmp
import os
import re
import shutil
from typing import Any, List, Optional, Sequence

from megatron_bloom.atomic import atomic_write, atomic_write_text  # noqa: F401 - the checkpoint's writers
from megatron_bloom.errors import UserError

LATEST = "latest"
COMPLETE = "complete"
STATE_FILE = "megatron_bloom.pt"
RNG_DIR = "rng"
TOKENIZER_DIR = "tokenizer"
"""Sub-folder of a checkpoint folder holding the tokenizer files it came with (optional)."""

TAG_RE = re.compile(r"^global_step(\d+)$")
LAYER_FILE = "layer_{idx:02d}-model_{tp:02d}-model_states.pt"
LAYER_FILE_RE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
LAYER_FILE_GLOB = "layer_*-model_states.pt"
MP_RANK_FILE = "mp_rank_{tp:02d}_model_states.pt"
MP_RANK_FILE_RE = re.compile(r"^mp_rank_\d+_model_states\.pt$")


def tag_for(iteration: int) -> str:
    return f"global_step{iteration}"


def layer_file(idx: int, tp: int) -> str:
    return LAYER_FILE.format(idx=idx, tp=tp)


def mp_rank_file(tp: int) -> str:
    return MP_RANK_FILE.format(tp=tp)


def rng_file(rank: int) -> str:
    """Path of ``rank``'s RNG states relative to the checkpoint folder."""
    return os.path.join(RNG_DIR, f"rank_{rank:05d}.pt")


# ---- writing -----------------------------------------------------------------------------------


def atomic_torch_save(obj: Any, path: str) -> None:
    import torch

    # torch.save is looked up at call time: the save-fault hook of the reliability tests replaces it.
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


# ---- tokenizer files ---------------------------------------------------------------------------

# Model configs and index files that sit beside a tokenizer in a transformers folder.
_TOKENIZER_SKIP = {"config.json", "generation_config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}


def has_tokenizer_files(folder: str) -> bool:
    """Whether ``folder`` holds a transformers tokenizer (tokenizer.json, its config or a vocab)."""
    return any(os.path.isfile(os.path.join(folder, n)) for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


def tokenizer_files(src: str) -> List[str]:
    """Names of a tokenizer folder's files (not weights or model configs); a UserError when it has none.

    Cheap, so converters call it first: a wrong --tokenizer fails before any weight is read.
    """
    if not os.path.isdir(src):
        raise UserError(f"tokenizer folder {src} does not exist; pass the folder holding tokenizer.json "
                        f"(e.g. from data_tools/train_tokenizer.py)")
    names = [n for n in sorted(os.listdir(src))
             if os.path.isfile(os.path.join(src, n)) and n not in _TOKENIZER_SKIP
             and not n.endswith((".safetensors", ".bin", ".pt"))]
    if not any(n.startswith("tokenizer") or n in ("vocab.json", "spiece.model") for n in names):
        raise UserError(f"{src} has no tokenizer files (tokenizer.json, tokenizer_config.json, ...)")
    return names


def copy_tokenizer_files(src: str, dst: str) -> List[str]:
    """Copy a tokenizer folder's files (not weights or model configs) into ``dst``; returns names."""
    names = tokenizer_files(src)
    os.makedirs(dst, exist_ok=True)
    for n in names:
        shutil.copyfile(os.path.join(src, n), os.path.join(dst, n))
    return names


def first_tokenizer_folder(candidates: Sequence[Optional[str]]) -> Optional[str]:
    """The first of ``candidates`` that is a local folder holding tokenizer files; None when none
    is (not given, a Hub name, a checkpoint without ``tokenizer/``)."""
    for folder in candidates:
        if folder and os.path.isdir(folder):
            try:
                tokenizer_files(folder)
            except UserError:
                continue
            return folder
    return None


def save_tokenizer_files(src: str, checkpoint_dir: str) -> bool:
    """``src``'s tokenizer files as ``<checkpoint_dir>/tokenizer``, unless it holds exactly them already.

    Returns whether anything was written. The files are copied into a temporary folder that is
    then renamed into place, so a reader sees a whole tokenizer or none (a different one already
    there is moved aside just before the rename, then deleted).
    """
    names = tokenizer_files(src)
    dst = os.path.join(checkpoint_dir, TOKENIZER_DIR)
    if os.path.isdir(dst) and sorted(os.listdir(dst)) == names and all(
            filecmp.cmp(os.path.join(src, n), os.path.join(dst, n), shallow=False) for n in names):
        return False
    tmp, old = f"{dst}.tmp.{os.getpid()}", f"{dst}.old.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        copy_tokenizer_files(src, tmp)
        if os.path.isdir(dst):
            os.replace(dst, old)
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return True
