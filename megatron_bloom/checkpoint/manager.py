"""Save and resume: DeepSpeed's engine files in Megatron-DeepSpeed's BLOOM layout, plus our state.

    <save>/latest                       the tag of the newest COMPLETE checkpoint ("global_step12")
    <save>/global_step12/
        layer_XX-model_YY-model_states.pt   weights per pipeline layer and TP rank (DeepSpeed)
        mp_rank_YY_model_states.pt          engine state per model-parallel rank (DeepSpeed), with
                                            Megatron-DeepSpeed's args/iteration (megatron_args.py)
        *_optim_states.pt                   ZeRO / bf16 optimizer shards (DeepSpeed)
        megatron_bloom.pt                   iteration, consumed samples/tokens, schedules, config
        rng/rank_00003.pt                   every rank's RNG states
        complete                            written after every rank finished

A save counts only once complete on every rank: rank 0 writes ``complete`` and then moves
``latest`` (atomically) only after every rank reported its own files on disk. A save killed
halfway leaves ``latest`` on the previous checkpoint, which is where a restart resumes; the next
save of that iteration starts from an empty folder, and the next save that completes deletes
what is left of any unfinished one.

A save that fails on any rank (disk full, permissions) fails on every rank with the same
one-line error: the ranks agree on the outcome after each phase instead of meeting at a bare
barrier, so no rank is left waiting for one that gave up. The half-written folder is removed
and ``latest`` still names the previous checkpoint.
"""
from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_bloom.checkpoint.files import (
    COMPLETE,
    LATEST,
    RNG_DIR,
    STATE_FILE,
    TAG_RE,
    atomic_torch_save,
    atomic_write_text,
    mp_rank_file,
    rng_file,
    save_tokenizer_files,
    tag_for,
)
from megatron_bloom.checkpoint.megatron_args import megatron_enums_importable, trainer_state_from_megatron
from megatron_bloom.checkpoint.trust import load_megatron_state, safe_load
from megatron_bloom.distributed.collectives import all_gather_object, barrier
from megatron_bloom.errors import UserError
from megatron_bloom.layers.random import default_generator


SAVE_HOOK_ENV = "MEGATRON_BLOOM_TEST_SAVE_HOOK"
"""Fault injection for the reliability tests, read at every save (never set it in a real run).

``hold@12``: rank 0 stops forever once every rank's files of global_step12 are on disk, before
``complete`` (so a kill lands inside a save). ``ENOSPC@8:1`` (any errno name): rank 1's first
file write of global_step8 leaves a partial file and raises that OSError, as a full disk does.
"""


def _read_latest(save_dir: str) -> Optional[str]:
    try:
        with open(os.path.join(save_dir, LATEST)) as fh:
            return fh.read().strip()
    except OSError:
        return None


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
        engine_file = os.path.join(path, mp_rank_file(0))
        if os.path.isfile(engine_file):
            # A Megatron-DeepSpeed training checkpoint: its counters and layout are in its args.
            state = trainer_state_from_megatron(load_megatron_state(engine_file), engine_file)
            return CheckpointInfo(load_dir, tag, state)
        raise UserError(
            f"checkpoint {path} has neither {STATE_FILE} nor {mp_rank_file(0)}: it is incomplete, or not a "
            f"training checkpoint (convert weights with megatron-bloom-convert-checkpoint)"
        )
    try:
        state = safe_load(state_file)
    except UserError as exc:
        raise UserError(f"checkpoint file {exc}; delete {path} and point {latest} at the previous checkpoint") from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise UserError(f"checkpoint file {state_file} is not a megatron-bloom trainer state; delete {path} and "
                        f"point {latest} at the previous checkpoint")
    return CheckpointInfo(load_dir, tag, state)


def check_compatible(info: CheckpointInfo, model_cfg) -> None:
    """Refuse a checkpoint of another model shape before any weights are read (a Megatron-DeepSpeed
    checkpoint's args may not record the real vocabulary size: then its padded one is compared)."""
    saved = info.state["config"]["model"]
    for key in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "ffn_hidden_size"):
        if key == "vocab_size" and key not in saved:
            continue  # a Megatron-DeepSpeed checkpoint: its padded row count is compared below
        if saved.get(key) != getattr(model_cfg, key):
            raise UserError(
                f"checkpoint {info.path} has {key}={saved.get(key)} but the configuration says "
                f"{getattr(model_cfg, key)}; use the checkpoint's model configuration or another --load"
            )
    if "padded_vocab_size" in saved:
        tp = info.layout["tp"]
        if saved["padded_vocab_size"] != model_cfg.padded_vocab_size(tp):
            raise UserError(
                f"checkpoint {info.path} has an embedding of {saved['padded_vocab_size']} rows, but vocab_size "
                f"{model_cfg.vocab_size} pads to {model_cfg.padded_vocab_size(tp)} at TP={tp}; set --vocab-size to "
                f"the checkpoint's ({saved['padded_vocab_size']} for BLOOM's 250,880)"
            )


def rng_state(tracker=None) -> Dict[str, Any]:
    """Every random stream of this rank: python, numpy, torch's CPU generator, and with a tracker
    the default generator of the rank's own device plus the tracked dropout streams."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        # Tensors and plain numbers only, so the file loads with torch.load(weights_only=True).
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if tracker is not None:
        # On CPU the device generator is the CPU one again; saving it twice keeps one code path.
        state["device"] = default_generator(tracker.device).get_state()
        state["tracker"] = tracker.get_states()
    return state


def set_rng_state(state: Dict[str, Any], tracker=None) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if tracker is not None and "tracker" in state:
        if state.get("device") is not None:
            default_generator(tracker.device).set_state(state["device"])
        tracker.set_states(state["tracker"])


def save_checkpoint(engine, save_dir: str, iteration: int, trainer_state: Dict[str, Any], keep_last_k: Optional[int],
                    client_state: Optional[Dict[str, Any]] = None, tokenizer_dir: Optional[str] = None) -> str:
    """Save on every rank; returns the checkpoint path. Collective: every rank must call it.

    ``client_state`` goes into DeepSpeed's engine files (Megatron-DeepSpeed's args and counters).
    ``tokenizer_dir``'s tokenizer files go to ``<save_dir>/tokenizer`` (rank 0, before the
    weights; nothing is written when that folder holds them already).

    Raises the same ``UserError`` on every rank when a write fails on any of them; the previous
    checkpoint is then untouched and still named by ``latest``.
    """
    tag = tag_for(iteration)
    path = os.path.join(save_dir, tag)
    rank = dist.get_rank()
    hook = _SaveHook.from_env(iteration, rank)
    failure = _attempt(lambda: _prepare_folder(save_dir, tag, tokenizer_dir), save_dir) if rank == 0 else None
    _agree(failure, save_dir, tag)
    try:
        with hook.inject_fault(), megatron_enums_importable():
            engine.engine.save_checkpoint(save_dir, tag=tag, client_state=client_state or {}, save_latest=False)
    except (OSError, RuntimeError) as exc:
        failure = _write_failure(exc, save_dir)
        # DeepSpeed's save ends in a barrier (it has no collective between its file writes) that
        # the other ranks are waiting in now; meet them there, then agree on the outcome.
        barrier()
    if failure is None:
        failure = _attempt(lambda: _save_own_files(engine, path, rank, trainer_state), save_dir)
    # Every rank's files are on disk past this point; only then is the checkpoint complete.
    _agree(failure, save_dir, tag)
    hook.hold(tag)
    failure = _attempt(lambda: _commit(save_dir, tag, keep_last_k), save_dir) if rank == 0 else None
    _agree(failure, save_dir, tag)
    return path


def _prepare_folder(save_dir: str, tag: str, tokenizer_dir: Optional[str] = None) -> None:
    path = os.path.join(save_dir, tag)
    if tokenizer_dir:
        save_tokenizer_files(tokenizer_dir, save_dir)
    if os.path.isdir(path) and _read_latest(save_dir) != tag:
        # A leftover of a save that never completed (killed, disk full): start from an empty
        # folder so that no file of that attempt (maybe at another layout) sits beside the new ones.
        shutil.rmtree(path)
    os.makedirs(os.path.join(path, RNG_DIR), exist_ok=True)
    # A marker left by an earlier save of the same iteration must not survive this one.
    if os.path.exists(os.path.join(path, COMPLETE)):
        os.remove(os.path.join(path, COMPLETE))


def _save_own_files(engine, path: str, rank: int, trainer_state: Dict[str, Any]) -> None:
    atomic_torch_save(rng_state(engine.tracker), os.path.join(path, rng_file(rank)))
    if rank == 0:
        atomic_torch_save(trainer_state, os.path.join(path, STATE_FILE))


def _commit(save_dir: str, tag: str, keep_last_k: Optional[int]) -> None:
    atomic_write_text(os.path.join(save_dir, tag, COMPLETE), tag + "\n")
    atomic_write_text(os.path.join(save_dir, LATEST), tag)
    for leftover in unfinished_tags(save_dir):
        shutil.rmtree(os.path.join(save_dir, leftover), ignore_errors=True)
    if keep_last_k:
        prune(save_dir, keep_last_k)


def _errno_text(exc: OSError) -> str:
    if exc.errno is None:
        return str(exc)
    return f"[Errno {exc.errno}] {exc.strerror or os.strerror(exc.errno)}"


def _write_failure(exc: BaseException, save_dir: str) -> Dict[str, Any]:
    """What this rank reports when writing its files failed; re-raises anything that is not a write error."""
    if isinstance(exc, OSError):
        error, filename = _errno_text(exc), exc.filename
    # torch.save reports a full disk as "[enforce fail at inline_container.cc:...] unexpected pos ..."
    # (its zip writer has no errno): name it as the write failure it is.
    elif isinstance(exc, RuntimeError) and ("inline_container" in str(exc) or "PytorchStreamWriter" in str(exc)):
        error, filename = f"torch.save failed ({str(exc).splitlines()[0]})", None
    else:
        raise exc
    return {"rank": dist.get_rank(), "error": error, "file": filename, "free_mb": _free_mb(save_dir)}


def _attempt(write, save_dir: str) -> Optional[Dict[str, Any]]:
    try:
        write()
    except (OSError, RuntimeError) as exc:
        return _write_failure(exc, save_dir)
    return None


def _agree(failure: Optional[Dict[str, Any]], save_dir: str, tag: str) -> None:
    """Collective: every rank learns every rank's outcome; on any failure all raise the same error.

    Replaces a barrier: a rank whose write failed still shows up here, so the others never wait
    for it until the collective timeout.
    """
    outcomes: List[Optional[Dict[str, Any]]] = all_gather_object(failure)
    failed = [o for o in outcomes if o is not None]
    if not failed:
        return
    first = failed[0]
    latest = _read_latest(save_dir)
    if dist.get_rank() == 0 and latest != tag:
        # Nothing names the half-written folder; removing it gives back the space it took.
        shutil.rmtree(os.path.join(save_dir, tag), ignore_errors=True)
    where = f"rank {first['rank']}" + (f", {first['file']}" if first["file"] else "")
    previous = (f"the previous checkpoint {latest} is intact and the same command resumes from it" if latest
                else "there is no earlier checkpoint")
    raise UserError(f"could not save checkpoint {tag} to {save_dir}: {first['error']} ({where}; "
                    f"{first['free_mb']} MB free there); free space, check permissions, or point --save at "
                    f"another directory; {previous}")


def _free_mb(directory: str) -> str:
    try:
        return f"{shutil.disk_usage(directory).free / 2**20:,.0f}"
    except OSError:
        return "?"


@dataclass
class _SaveHook:
    """The ``MEGATRON_BLOOM_TEST_SAVE_HOOK`` fault injection for this rank and save (inert by default)."""

    hold_here: bool = False
    fault_errno: Optional[int] = None

    @classmethod
    def from_env(cls, iteration: int, rank: int) -> "_SaveHook":
        spec = os.environ.get(SAVE_HOOK_ENV, "")
        m = re.fullmatch(r"(\w+)@(\d+)(?::(\d+))?", spec)
        if not m or int(m.group(2)) != iteration:
            return cls()
        kind, target = m.group(1), int(m.group(3) or 0)
        if target != rank:
            return cls()
        if kind == "hold":
            return cls(hold_here=True)
        return cls(fault_errno=getattr(errno, kind))

    @contextlib.contextmanager
    def inject_fault(self) -> Iterator[None]:
        if self.fault_errno is None:
            yield
            return
        real_save = torch.save

        def failing_save(obj, f, *args, **kwargs):
            with open(f, "wb") as fh:
                fh.write(b"PK\x03\x04 partial")  # what a full disk leaves: the start of a zip file
            raise OSError(self.fault_errno, os.strerror(self.fault_errno), f)

        torch.save = failing_save
        try:
            yield
        finally:
            torch.save = real_save

    def hold(self, tag: str) -> None:
        if not self.hold_here:
            return
        print(f"test hook: holding {tag} before its '{COMPLETE}' marker", flush=True)
        while True:
            time.sleep(1)


def complete_tags(save_dir: str) -> List[str]:
    tags = [n for n in os.listdir(save_dir) if TAG_RE.match(n) and os.path.isfile(os.path.join(save_dir, n, COMPLETE))]
    return sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))


def unfinished_tags(save_dir: str) -> List[str]:
    """Folders of our saves that never completed (killed mid-save, e.g. a signal's save at an
    iteration the resumed run will not save again): ``rng/`` is made first, ``complete`` last.
    Folders without ``rng/`` (a Megatron-DeepSpeed checkpoint sharing --save) are not ours."""
    return [n for n in os.listdir(save_dir) if TAG_RE.match(n) and os.path.isdir(os.path.join(save_dir, n, RNG_DIR))
            and not os.path.isfile(os.path.join(save_dir, n, COMPLETE))]


def prune(save_dir: str, keep_last_k: int) -> None:
    """Delete complete checkpoints older than the newest ``keep_last_k`` (never the one ``latest`` names)."""
    latest = open(os.path.join(save_dir, LATEST)).read().strip()
    tags = complete_tags(save_dir)
    for tag in tags[: max(len(tags) - keep_last_k, 0)]:
        if tag != latest:
            shutil.rmtree(os.path.join(save_dir, tag), ignore_errors=True)


def load_rng(info: CheckpointInfo, rank: int, same_layout: bool, tracker=None) -> bool:
    """Restore this rank's RNG streams when the layout is unchanged; returns whether it did."""
    path = os.path.join(info.path, rng_file(rank))
    if not same_layout or not os.path.isfile(path):
        return False
    set_rng_state(safe_load(path), tracker)
    return True
