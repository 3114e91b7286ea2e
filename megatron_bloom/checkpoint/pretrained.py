"""``--pretrained``: the weights a finetune starts from, as a native checkpoint with layer files.

A native checkpoint with layer files (any layout) is used where it is. A transformers folder, or a
native checkpoint holding only engine files (PP = 1 under ZeRO-2/3), is converted once by rank 0 to
a weights-only native checkpoint in ``<run>/pretrained``; every rank waits for it (polling its files,
not in a collective: converting BLOOM-176B takes longer than any collective timeout).
"""
from __future__ import annotations

import os
import shutil
from typing import Callable, Optional, Tuple

from megatron_bloom.checkpoint.files import LATEST, LAYER_FILE_RE, STATE_FILE, has_tokenizer_files
from megatron_bloom.config.schema import ModelConfig
from megatron_bloom.distributed.collectives import on_rank0_while_others_poll
from megatron_bloom.errors import UserError

PRETRAINED_DIR = "pretrained"
"""Sub-folder of the run directory holding a converted --pretrained source."""


def is_transformers_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def pretrained_model_config(path: str) -> ModelConfig:
    """The ModelConfig of a --pretrained source (reads only its configuration, not its weights)."""
    from megatron_bloom.checkpoint.native import model_config_from_state, read_state, resolve_checkpoint

    if not os.path.isdir(path):
        raise UserError(f"--pretrained {path}: no such directory")
    if is_transformers_folder(path):
        from megatron_bloom.checkpoint.hf import model_config_from_hf, read_config_json

        return model_config_from_hf(read_config_json(path), os.path.join(path, "config.json"))
    directory, tag = resolve_checkpoint(path)
    ckpt = os.path.join(directory, tag)
    return model_config_from_state(read_state(ckpt), os.path.join(ckpt, STATE_FILE))


def convert_once(write: Callable[[str], None], source: str, run_dir: Optional[str]) -> Tuple[str, str]:
    """Rank 0 calls ``write(folder)`` for <run>/pretrained (once per run); the other ranks wait for
    its ``latest`` file, polling, not in a collective that times out (``on_rank0_while_others_poll``).

    A collective: every rank calls it. Returns (directory, tag) of the converted checkpoint.
    """
    from megatron_bloom.checkpoint.native import resolve_checkpoint

    if not run_dir:
        raise UserError("--pretrained needs --save (or --load): the converted weights are written there")
    target = os.path.join(run_dir, PRETRAINED_DIR)

    def done() -> bool:
        return os.path.isfile(os.path.join(target, LATEST))

    def convert() -> None:
        if done():
            return  # converted by an earlier attempt of this run
        tmp = f"{target}.tmp.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            write(tmp)
            if os.path.exists(target):
                shutil.rmtree(target)  # an older attempt without its 'latest': incomplete
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"> converted --pretrained {source} to {target}", flush=True)

    on_rank0_while_others_poll(convert, done, failure_file=target + ".failed", what=f"converting --pretrained {source}")
    return resolve_checkpoint(target)


def pretrained_checkpoint(src: str, run_dir: Optional[str], tp: int) -> Tuple[str, str]:
    """(directory, tag) of a native checkpoint with layer files holding ``src``'s weights.

    A collective when ``src`` needs converting (every rank takes the same path).
    """
    from megatron_bloom.checkpoint import native

    if is_transformers_folder(src):
        from megatron_bloom.checkpoint import hf

        def write(out: str) -> None:
            cfg, layers = hf.iter_hf_checkpoint(src)
            special = hf.special_tokens_from_hf(hf.read_config_json(src))
            tok = src if has_tokenizer_files(src) else None
            native.write_native_checkpoint(layers, cfg, out, tp, tokenizer_dir=tok, special_tokens=special)

        return convert_once(write, src, run_dir)
    directory, tag = native.resolve_checkpoint(src)
    names = os.listdir(os.path.join(directory, tag))
    if any(LAYER_FILE_RE.match(n) for n in names):
        return directory, tag

    def write_merged(out: str) -> None:  # a PP=1 ZeRO-2 checkpoint: engine files only
        cfg, layers = native.iter_native_checkpoint(directory, tag)
        native.write_native_checkpoint(layers, cfg, out, tp)

    return convert_once(write_merged, src, run_dir)
