"""What a checkpoint file may hold, and how every one is read: as data, never by running its code.

``torch.load(weights_only=False)`` rebuilds whatever a pickle names, so a file from anywhere (BLOOM's
released training states, a colleague's run, a download) could run any code on every rank. Every
file of a checkpoint is therefore read weights-only: tensors, containers, numbers, and the classes
below, which DeepSpeed and Megatron-DeepSpeed store and which hold data only.

* Our readers call ``safe_load``.
* DeepSpeed's loaders call ``torch.load(weights_only=False)`` themselves (its checkpoint engine, its
  universal-checkpoint loader, ``ds_to_universal``). ``weights_only_loading()`` makes every load of
  the process weights-only: torch reads ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` at each call and lets it
  override an explicit ``weights_only=False``. Every entry point runs its command inside it
  (``cli.entry_point``) and child processes inherit the variable; ``deepspeed_loading()`` adds the
  allow-list where DeepSpeed reads (``engine.load``, ``run_with_megatron_enums``).
* ``check_checkpoint_folder`` reads every file of a folder so before any process group exists (the
  pickles only, tensors are memory-mapped) and refuses a file holding another class, a truncated
  one, or one whose keys are not what its name says, with one line naming the file.

Allowed besides torch's own list::

    argparse.Namespace, megatron.enums.*                 Megatron-DeepSpeed's args (megatron_args.py)
    numpy arrays                                         its numpy RNG state (np_rng_state)
    deepspeed.runtime.fp16.loss_scaler.LossScaler        the loss scaler of ZeRO and bf16 optimizer
    deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler   states
    deepspeed.runtime.zero.config.ZeroStageEnum          ZeRO optimizer states
    deepspeed.utils.tensor_fragment.fragment_address     ZeRO-1/2 and bf16 optimizer states
"""
from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import re
import warnings
import zipfile
from typing import Any, Iterator, List, Optional

from megatron_bloom.checkpoint.megatron_args import ALLOWED_GLOBALS as MEGATRON_GLOBALS
from megatron_bloom.errors import UserError

DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
"""DeepSpeed's classes in its optimizer files, by the name pickle records."""

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
FORCE_FULL_UNPICKLING = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"

TRUSTED = "tensors, plain values and the Megatron-DeepSpeed and DeepSpeed classes listed in docs/checkpoint-trust.md"

_CHECKPOINT_SUFFIXES = (".pt", ".bin", ".pth")


def _name(entry: Any) -> str:
    return entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}"


ALLOWED_NAMES = frozenset([*(_name(g) for g in MEGATRON_GLOBALS), *DEEPSPEED_GLOBALS])
"""Every class name a checkpoint file may refer to besides torch's own list."""


def _deepspeed_class(name: str) -> Optional[type]:
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None  # another DeepSpeed version: its files are refused, never unpickled in full


def allowed_globals(names: Optional[List[str]] = None) -> List[Any]:
    """The allow-list for ``torch.serialization.safe_globals``: Megatron-DeepSpeed's classes, and
    DeepSpeed's (all of them, or those in ``names``: importing DeepSpeed takes seconds)."""
    wanted = DEEPSPEED_GLOBALS if names is None else [n for n in DEEPSPEED_GLOBALS if n in names]
    found = [_deepspeed_class(n) for n in wanted]
    return [*MEGATRON_GLOBALS, *(cls for cls in found if cls is not None)]


@contextlib.contextmanager
def weights_only_loading() -> Iterator[None]:
    """Every ``torch.load`` in this process and its children is weights-only for the duration,
    including those that pass ``weights_only=False`` (DeepSpeed's)."""
    saved = {k: os.environ.get(k) for k in (FORCE_WEIGHTS_ONLY, FORCE_FULL_UNPICKLING)}
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    os.environ.pop(FORCE_FULL_UNPICKLING, None)  # torch refuses both set; ours wins
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def deepspeed_loading() -> Iterator[None]:
    """``weights_only_loading`` with the whole allow-list registered: for DeepSpeed's own loaders."""
    import torch

    with weights_only_loading(), torch.serialization.safe_globals(allowed_globals()):
        yield


def named_classes(path: str) -> Optional[List[str]]:
    """The classes a file names beyond torch's own list, read from its pickles without running them:
    the ``data.pkl`` of a ``torch.save`` zip, or the leading pickles of a legacy-format file or a bare
    pickle (None: neither could be read, so only a weights-only load can tell)."""
    import torch

    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - not a zip: a legacy-format file or a bare pickle
        pass
    from torch import _weights_only_unpickler

    known = set(_weights_only_unpickler._get_allowed_globals()) | set(_weights_only_unpickler._get_user_allowed_globals())
    try:
        return sorted(set(_stream_globals(path)) - known)
    except Exception:  # noqa: BLE001 - not a pickle at all: the load reports it
        return None


def _stream_globals(path: str, max_pickles: int = 5) -> List[str]:
    """``module.name`` of every GLOBAL / STACK_GLOBAL in the leading pickles of a file (a legacy
    ``torch.save`` file is five pickles, then raw tensor bytes)."""
    import io
    import pickletools

    names: List[str] = []
    with open(path, "rb") as raw:
        fh = io.BufferedReader(raw)
        for count in range(max_pickles):
            if count and fh.peek(1)[:1] != b"\x80":
                break  # end of file, or the raw tensor bytes after a legacy file's pickles
            strings: List[str] = []  # the strings pushed so far, for STACK_GLOBAL's two arguments
            memo: dict = {}
            memo_count, last = 0, None
            for op, arg, _ in pickletools.genops(fh):
                pushed = None
                if op.name == "GLOBAL":
                    names.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str) and "UNICODE" in op.name:
                    pushed = arg
                elif op.name == "MEMOIZE":
                    memo[memo_count], memo_count = last, memo_count + 1
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                    memo[arg] = last
                elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                    pushed = memo.get(arg)
                if pushed is not None:
                    strings.append(pushed)
                if op.name not in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
                    last = pushed
    return names


def refusal(path: str, classes: List[str]) -> str:
    shown = ", ".join(classes[:3]) + (f" and {len(classes) - 3} more" if len(classes) > 3 else "")
    return (f"{path} holds {shown}, which loading would build by running code: it was not read (checkpoint "
            f"files may hold only {TRUSTED}); replace it with the file from a source you trust")


def _reason(exc: BaseException) -> str:
    """The first line of a load failure; of torch's weights-only refusal, the line saying what was
    refused (its advice to pass weights_only=False must not be followed for a file from elsewhere)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        skip = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1) ", "(2) ",
                "WeightsUnpickler error")
        lines = [ln for ln in lines if not ln.startswith(skip)] or lines
    return lines[0].split(". ")[0][:200] if lines else type(exc).__name__


def safe_load(path: str, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` of a file from anywhere, with the allow-list; any refusal or
    failure is a UserError naming the file (and the classes, when it holds others)."""
    import torch

    if not os.path.isfile(path):
        raise UserError(f"{path} is missing")
    named = named_classes(path)
    refused = [n for n in named or () if n not in ALLOWED_NAMES]
    if refused:
        raise UserError(refusal(path, refused))
    zip_format = zipfile.is_zipfile(path)  # memory-mapped tensors need torch.save's zip format
    try:
        with warnings.catch_warnings():
            # Any unusual pickle is reported below as an error; torch's extra warning would only
            # add lines to a one-line message.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            with torch.serialization.safe_globals(allowed_globals(named)):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zip_format)
    except Exception as exc:  # noqa: BLE001 - unpickling errors have many types
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if isinstance(exc, pickle.UnpicklingError) and found and found.group(1) not in ALLOWED_NAMES:
            raise UserError(refusal(path, [found.group(1)])) from None
        # The zip directory says why more plainly than the loader (a memory-mapped load of a cut
        # file reports only "[Errno 22] Invalid argument").
        why = _truncation(path) or _reason(exc)
        raise UserError(f"{path} is corrupt, truncated or not a tensor file ({why})") from None


def load_megatron_state(path: str) -> dict:
    """An engine file's dict (``mp_rank_XX_model_states.pt``: Megatron-DeepSpeed's args and DeepSpeed's
    keys), read by ``safe_load``."""
    state = safe_load(path)
    if not isinstance(state, dict):
        raise UserError(f"{path} does not hold a dict")
    return state


# ---- a whole folder, before anything is loaded -------------------------------------------------------------


def _truncation(path: str) -> Optional[str]:
    """Why a ``torch.save`` file is unreadable, from its zip directory alone (None: it reads)."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head[:1] == b"\x80" and size > 2:
        return None  # legacy (non-zip) format: a pickle stream, checked by loading it weights-only
    if head != b"PK\x03\x04":
        return "empty file" if size == 0 else "not a torch.save file"
    try:
        with zipfile.ZipFile(path) as zf:
            end = max((i.header_offset + i.compress_size for i in zf.infolist()), default=0)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "a record ends past the end of the file" if end > size else None


_EXPECTED: List[tuple] = [
    # (file name pattern, what its dict must hold, a check of the loaded object)
    (re.compile(r".*optim_states\.pt$"), "a DeepSpeed optimizer state ('optimizer_state_dict')",
     lambda sd: isinstance(sd.get("optimizer_state_dict"), dict)),
    (re.compile(r"mp_rank_\d+_model_states\.pt$"), "a DeepSpeed engine state ('module')",
     lambda sd: "module" in sd),
    (re.compile(r"layer_\d+-model_\d+-model_states\.pt$"), "a pipeline layer's tensors",
     lambda sd: all(_is_tensor(v) for v in sd.values())),
    (re.compile(r"(fp32|exp_avg|exp_avg_sq)\.pt$"), "a universal checkpoint's tensor ('param')",
     lambda sd: _is_tensor(sd.get("param"))),
]


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def checkpoint_files(folder: str) -> List[str]:
    """Every file ``torch.load`` may read in ``folder`` and below (a universal checkpoint nests them)."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        found += [os.path.join(root, n) for n in sorted(names) if n.endswith(_CHECKPOINT_SUFFIXES)]
    return found


def check_file(path: str, fix: str) -> None:
    """One file as ``check_checkpoint_folder`` checks it; ``fix`` ends the message of a broken one."""
    reason = _truncation(path)
    if reason:
        raise UserError(f"{path} is corrupt or truncated ({reason}); {fix}")
    state = safe_load(path, mmap=True)
    name = os.path.basename(path)
    for pattern, what, holds in _EXPECTED:
        if pattern.match(name):
            if not isinstance(state, dict) or not holds(state):
                keys = ", ".join(map(str, list(state)[:4])) if isinstance(state, dict) else type(state).__name__
                raise UserError(f"{path} is not {what}: it holds {keys or 'nothing'}; {fix}")
            break


def check_checkpoint_folder(folder: str, fix: str = "restore it from the run that wrote it") -> int:
    """Refuse a folder with any file that holds a class off the allow-list, is truncated, or is not
    what its name says, before anything is loaded from it. Returns the number of files checked.

    Each file's pickle is read weights-only with its tensors memory-mapped, so a checkpoint of any
    size is checked in seconds per thousand files."""
    files = checkpoint_files(folder)
    for path in files:
        check_file(path, fix)
    return len(files)
