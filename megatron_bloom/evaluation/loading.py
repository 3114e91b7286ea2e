"""A checkpoint (native at any TP/PP, or a transformers folder) and its tokenizer, ready to score.

Loading is ``megatron_bloom.generation.load_model`` (native checkpoints are merged to one
process), with the device checked, the model moved there, and the tokenizer and the special ids
resolved there; this module adds what evaluation needs on top: a default window length and the
checkpoint's iteration (the TensorBoard step of its results).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_bloom.errors import UserError
from megatron_bloom.generation import SpecialTokens, load_model

_NO_LIMIT = 10**9
"""A tokenizer's ``model_max_length`` at or above this means 'not set' (transformers uses 1e30)."""


@dataclass
class EvalModel:
    model: torch.nn.Module
    """``BloomForCausalLM`` in eval mode on ``device``."""
    tokenizer: Any
    """``megatron_bloom.data.tokenizer.Tokenizer``."""
    bos_id: Optional[int]
    eos_id: Optional[int]
    pad_id: int
    seq_length: int
    """The checkpoint's training sequence length (see ``_seq_length``)."""
    iteration: int
    """Training iteration of a native checkpoint, 0 for a transformers folder."""
    device: torch.device
    """Where ``model`` lives; every batch scored is made there (``scoring.score_requests``)."""

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def prefix_id(self, which: str = "bos") -> int:
        """Id conditioning a document's first token (``generation.SpecialTokens.prefix``)."""
        return SpecialTokens(self.bos_id, self.eos_id, self.pad_id).prefix(which)

    def default_max_length(self) -> int:
        """The tokenizer's ``model_max_length`` when it sets one (as lm-eval's ``hf`` model
        resolves it for BLOOM, whose config names no length), else the checkpoint's seq_length."""
        limit = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(limit, int) and 0 < limit < _NO_LIMIT:
            return limit
        return self.seq_length


HF_DEFAULT_MAX_LENGTH = 2048
"""Window of a transformers folder whose config and tokenizer name no length (lm-eval's default)."""


def _seq_length(path: str, configured: int) -> int:
    """A native checkpoint's training seq_length; a transformers folder's ``seq_length`` if its
    config.json has one (BLOOM's names no other length key), else ``HF_DEFAULT_MAX_LENGTH``."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return configured
    with open(config, encoding="utf-8") as fh:
        value = json.load(fh).get("seq_length")
    return int(value) if isinstance(value, int) and value > 0 else HF_DEFAULT_MAX_LENGTH


def _iteration(path: str) -> int:
    if os.path.isfile(os.path.join(path, "config.json")):
        return 0
    from megatron_bloom.checkpoint.native import read_state, resolve_checkpoint

    directory, tag = resolve_checkpoint(path)
    value = read_state(os.path.join(directory, tag)).get("iteration", 0)
    return int(value) if isinstance(value, int) else 0


def load_for_eval(
    load: str,
    tokenizer: Optional[str] = None,
    dtype: Optional[str] = None,
    attention_impl: Optional[str] = None,
    device: Optional[str] = None,
) -> EvalModel:
    """Load ``load`` and its tokenizer (``tokenizer`` folder, else the checkpoint's own files) on
    ``device`` (default cpu; ``generation.resolve_device`` checks it before any weight is read).

    Every failure is a ``UserError`` naming the path or the device: a checkpoint that does not load
    is bad input.
    """
    try:
        loaded = load_model(load, dtype=dtype, attention_impl=attention_impl, tokenizer=tokenizer, with_tokenizer=True,
                            device=device)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch/safetensors/json raise many kinds on a bad file
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UserError(f"cannot load a model from {load} ({type(exc).__name__}: {first})") from None
    tok, ids = loaded.tokenizer, loaded.ids
    vocab = loaded.config.vocab_size
    if len(tok) > vocab:
        raise UserError(f"the tokenizer in {loaded.tokenizer_dir} has {len(tok)} tokens but the model only {vocab} rows")
    return EvalModel(model=loaded.model, tokenizer=tok, bos_id=ids.bos, eos_id=ids.eos, pad_id=ids.pad,
                     seq_length=_seq_length(load, loaded.config.seq_length), iteration=_iteration(load),
                     device=loaded.device)
