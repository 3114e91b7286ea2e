"""Save and resume: DeepSpeed's engine files in Megatron-DeepSpeed's BLOOM layout, plus our state.

    <save>/latest                       the tag of the newest COMPLETE checkpoint ("global_step12")
    <save>/global_step12/
        layer_XX-model_YY-model_states.pt   weights per pipeline layer and TP rank (DeepSpeed)
        mp_rank_YY_model_states.pt          engine state per model-parallel rank (DeepSpeed)
        *_optim_states.pt                   ZeRO / bf16 optimizer shards (DeepSpeed)
        megatron_bloom.pt                   iteration, consumed samples/tokens, schedules, config
        rng/rank_00003.pt                   every rank's RNG states
        complete                            written after every rank finished

A save counts only once complete on every rank: rank 0 writes ``complete`` and then moves
``latest`` (atomically) only after a barrier that every rank reaches after its own files are on
disk. A save killed halfway leaves ``latest`` on the previous checkpoint, which is where a
restart resumes.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_bloom.cli import UserError

LATEST = "latest"
COMPLETE = "complete"
STATE_FILE = "megatron_bloom.pt"
TAG_RE = re.compile(r"^global_step(\d+)$")


def tag_for(iteration: int) -> str:
    return f"global_step{iteration}"


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _atomic_torch_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


@dataclass
class CheckpointInfo:
    directory: str
    tag: str
    state: Dict[str, Any]
    """Contents of megatron_bloom.pt: iteration, layout, config, trainer state."""

    @property
    def path(self) -> str:
        return os.path.join(self.directory, self.tag)

    @property
    def layout(self) -> Dict[str, int]:
        return self.state["layout"]


def find_checkpoint(load_dir: Optional[str]) -> Optional[CheckpointInfo]:
    """The newest complete checkpoint in ``load_dir``, or None when there is none yet.

    An empty or missing directory is not an error (the first run and every requeue use the same
    command); a ``latest`` that names a missing or incomplete checkpoint, or an unreadable state
    file, is.
    """
    if not load_dir or not os.path.isdir(load_dir):
        return None
    latest = os.path.join(load_dir, LATEST)
    if not os.path.isfile(latest):
        if any(TAG_RE.match(n) for n in os.listdir(load_dir)):
            warnings.warn(f"{load_dir} has checkpoint folders but no '{LATEST}' file: none completed; starting from scratch")
        return None
    tag = open(latest).read().strip()
    path = os.path.join(load_dir, tag)
    state_file = os.path.join(path, STATE_FILE)
    if not os.path.isdir(path):
        raise UserError(f"{latest} names '{tag}' but {path} does not exist; fix or delete {latest}")
    if not os.path.isfile(state_file):
        raise UserError(
            f"checkpoint {path} has no {STATE_FILE}: it was not written by megatron-bloom "
            f"(convert it with launch/convert_checkpoint.py) or it is incomplete"
        )
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise UserError(f"checkpoint file {state_file} is corrupt or truncated ({type(exc).__name__}); "
                        f"delete {path} and point {latest} at the previous checkpoint") from None
    return CheckpointInfo(load_dir, tag, state)


def check_compatible(info: CheckpointInfo, model_cfg) -> None:
    """Refuse a checkpoint of another model shape before any weights are read."""
    saved = info.state["config"]["model"]
    for key in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "ffn_hidden_size"):
        if saved.get(key) != getattr(model_cfg, key):
            raise UserError(
                f"checkpoint {info.path} has {key}={saved.get(key)} but the configuration says "
                f"{getattr(model_cfg, key)}; use the checkpoint's model configuration or another --load"
            )


def rng_state(tracker=None) -> Dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        # Tensors and plain numbers only, so the file loads with torch.load(weights_only=True).
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    if tracker is not None:
        state["tracker"] = tracker.get_states()
    return state


def set_rng_state(state: Dict[str, Any], tracker=None) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if tracker is not None and "tracker" in state:
        tracker.set_states(state["tracker"])


def save_checkpoint(engine, save_dir: str, iteration: int, trainer_state: Dict[str, Any], keep_last_k: Optional[int]) -> str:
    """Save on every rank; returns the checkpoint path. Collective: every rank must call it."""
    tag = tag_for(iteration)
    path = os.path.join(save_dir, tag)
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(os.path.join(path, "rng"), exist_ok=True)
        # A leftover marker from an interrupted save of the same iteration must not survive.
        if os.path.exists(os.path.join(path, COMPLETE)):
            os.remove(os.path.join(path, COMPLETE))
    dist.barrier()
    engine.engine.save_checkpoint(save_dir, tag=tag, save_latest=False)
    _atomic_torch_save(rng_state(engine.tracker), os.path.join(path, "rng", f"rank_{rank:05d}.pt"))
    if rank == 0:
        _atomic_torch_save(trainer_state, os.path.join(path, STATE_FILE))
    # Every rank's files are on disk past this point; only then is the checkpoint complete.
    dist.barrier()
    if rank == 0:
        _atomic_write_text(os.path.join(path, COMPLETE), tag + "\n")
        _atomic_write_text(os.path.join(save_dir, LATEST), tag)
        if keep_last_k:
            prune(save_dir, keep_last_k)
    dist.barrier()
    return path


def complete_tags(save_dir: str) -> List[str]:
    tags = [n for n in os.listdir(save_dir) if TAG_RE.match(n) and os.path.isfile(os.path.join(save_dir, n, COMPLETE))]
    return sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))


def prune(save_dir: str, keep_last_k: int) -> None:
    """Delete complete checkpoints older than the newest ``keep_last_k`` (never the one ``latest`` names)."""
    latest = open(os.path.join(save_dir, LATEST)).read().strip()
    tags = complete_tags(save_dir)
    for tag in tags[: max(len(tags) - keep_last_k, 0)]:
        if tag != latest:
            shutil.rmtree(os.path.join(save_dir, tag), ignore_errors=True)


def load_rng(info: CheckpointInfo, rank: int, same_layout: bool, tracker=None) -> bool:
    """Restore this rank's RNG streams when the layout is unchanged; returns whether it did."""
    path = os.path.join(info.path, "rng", f"rank_{rank:05d}.pt")
    if not same_layout or not os.path.isfile(path):
        return False
    set_rng_state(torch.load(path, map_location="cpu", weights_only=True), tracker)
    return True
