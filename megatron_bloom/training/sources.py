"""Values a Megatron-DeepSpeed command line leaves to other files: its DeepSpeed JSON and its tokenizer
(here, not in config/, because the tokenizer is read with the data layer).

``fill_from_sources`` runs after the flags and YAML are parsed and before ``validate_config``:

- ``--deepspeed_config FILE`` fills batch sizes, ZeRO stage, clipping, precision and fp16 loss
  scaling that no flag or YAML sets (``deepspeed_json.py``);
- without ``--vocab-size``, the vocabulary is the tokenizer's, padded as Megatron-DeepSpeed pads
  it (``--pad-vocab-size-to``, else a multiple of ``--make-vocab-size-divisible-by`` x TP).
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Set

from megatron_bloom.errors import UserError
from megatron_bloom.config.vocab import megatron_padded_vocab_size

from megatron_bloom.config.deepspeed_json import apply_deepspeed_json
from megatron_bloom.config.schema import RunConfig


def tokenizer_size(name: str) -> int:
    """Tokens of the tokenizer ``name`` (a local folder, or a Hub name that is cached or online)."""
    from megatron_bloom.data.tokenizer import TokenizerLoadError, load_tokenizer

    try:
        return len(load_tokenizer(name))
    except TokenizerLoadError as exc:
        raise UserError(f"--tokenizer-name-or-path: {exc}") from None
    except OSError as exc:  # a Hub name without network or cache
        raise UserError(f"--tokenizer-name-or-path {name} did not load ({str(exc).splitlines()[0]}); pass a local "
                        f"tokenizer folder, or set --vocab-size") from None


def _local_or_cached_size(name: str) -> Optional[int]:
    """``tokenizer_size``; None for a Hub name this machine cannot reach (as the pre-flight, which
    leaves Hub names to the tools that read them)."""
    from megatron_bloom.data.tokenizer import looks_like_hub_id

    if not os.path.exists(os.path.expanduser(name)) and looks_like_hub_id(name):
        try:
            return tokenizer_size(name)
        except UserError:
            return None
    return tokenizer_size(name)


def fill_vocabulary(cfg: RunConfig, given: Dict[str, Set[str]], read_tokenizer: bool = True) -> None:
    """Set ``model.vocab_size`` (the embedding's rows) as Megatron-DeepSpeed sizes it.

    ``given['model']`` names the model fields a flag, the YAML or a checkpoint set. ``read_tokenizer``
    False (the planner, away from the data) reads a tokenizer only if its folder exists here. A Hub
    name that cannot be reached leaves ``--pad-vocab-size-to``, else the default or ``--model-name``'s
    vocabulary.
    """
    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    explicit = "vocab_size" in given.get("model", set())
    name = cfg.data.tokenizer_name_or_path
    tokens = None
    if explicit:
        tokens = m.vocab_size
    elif name and (read_tokenizer or os.path.exists(name)):
        tokens = _local_or_cached_size(name)
    if tokens is None:
        if m.pad_vocab_size_to is None:
            return  # the default (or --model-name's) vocabulary
        tokens = m.pad_vocab_size_to
    if m.pad_vocab_size_to is not None and tokens > m.pad_vocab_size_to:
        raise UserError(f"--pad-vocab-size-to {m.pad_vocab_size_to} is smaller than the vocabulary ({tokens} "
                        f"{'from --vocab-size' if explicit else 'tokens in ' + str(name)}); pad to at least "
                        f"{megatron_padded_vocab_size(tokens, tp, m.make_vocab_size_divisible_by)}")
    if explicit and m.pad_vocab_size_to is None:
        return
    m.vocab_size = megatron_padded_vocab_size(tokens, tp, m.make_vocab_size_divisible_by, m.pad_vocab_size_to)


def fill_from_sources(cfg: RunConfig, given: Dict[str, Set[str]], read_tokenizer: bool = True) -> None:
    """The DeepSpeed JSON's settings, then the vocabulary (see the module docstring)."""
    apply_deepspeed_json(cfg, given)
    fill_vocabulary(cfg, given, read_tokenizer=read_tokenizer)
