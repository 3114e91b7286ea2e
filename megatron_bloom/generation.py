"""Loading a checkpoint for inference, and the one decoding loop (generation and evaluation).

A model comes from a native checkpoint (any TP/PP: ``read_native_checkpoint`` merges it into one
process) or from a transformers folder (recognised by its ``config.json``); ``load_model`` also
loads its tokenizer (``data.tokenizer.load_tokenizer``) and resolves the special ids. Decoding is
incremental: the prompt runs once with ``use_cache=True``, then one token per step with the cache.
Prompts of different lengths are batched with LEFT padding and an attention mask (positions
come from ``cumsum(mask) - 1``, so padding does not shift ALiBi). Each sequence stops at EOS
(which is kept in its output), when the caller's ``is_done`` says so, or after ``max_new_tokens``.

Special tokens, the same for ``launch/generate.py``, the demo and every evaluation:

* each of BOS, EOS and PAD is the tokenizer's id, else the one the checkpoint records
  (a transformers ``config.json``, or a conversion's record); PAD falls back to EOS, then 0;
* the prefix (what conditions a document's or an empty prompt's first token) is BOS, falling
  back to EOS (``prefix="eos"`` asks for EOS/EOD first, falling back to BOS);
* decoding stops at EOS.

Padded vocabulary rows (added for TP divisibility) are never sampled: the LM head already gives
them ``finfo.min``, and the sampler sets every logit at or beyond ``vocab_size`` to -inf as well.

Everything runs on the model's device (``--device``, checked by ``resolve_device`` before any
weight is read): prompt ids and masks are made there, the KV cache stays there, and a seeded
sample draws from a ``torch.Generator`` of that device. The code is the same for every device
(no CUDA branch), so CPU tests run what a GPU runs; the same seed gives different samples on
different device types (each has its own random stream).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from megatron_bloom.errors import UserError
from megatron_bloom.config.schema import ModelConfig

DEVICE_HELP = "torch device to run on, e.g. cpu, cuda, cuda:1 (default cpu)"
"""``--device`` help of generate.py and evaluate.py (the same flag, the same words)."""


class DeviceUnavailable(UserError):
    """A well-formed device name this machine cannot run on (e.g. cuda without a GPU)."""


def resolve_device(device: Optional[str | torch.device] = None) -> torch.device:
    """``device`` (default cpu) as a ``torch.device`` that works here, else a ``UserError``.

    It is tried, not looked up: one float is made on it and read back, which is what decoding does
    with every token, so a device that is absent (no driver, an index past the last GPU) or holds
    no data (meta) fails here, in one line, before any weight is read.
    """
    spec = str(device) if device is not None else "cpu"  # as given: torch.device("cuda:999") prints cuda:-25
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UserError(f"device {spec!r} is not a torch device name ({first}); use e.g. cpu, cuda or cuda:1") from None
    try:
        torch.zeros(1, device=dev).tolist()
    except Exception as exc:  # noqa: BLE001 - each backend fails its own way (AssertionError, RuntimeError, ...)
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise DeviceUnavailable(f"device {spec!r} cannot be used on this machine ({type(exc).__name__}: "
                                f"{first}); choose an available device, e.g. cpu") from None
    return dev


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's weights: where its inputs are made and its samples drawn."""
    return next(model.parameters()).device


@dataclass
class SpecialTokens:
    """BOS/EOS/PAD ids in the order the module docstring gives."""

    bos: Optional[int]
    eos: Optional[int]
    pad: int

    @classmethod
    def resolve(cls, tokenizer: Any, recorded: Dict[str, Optional[int]]) -> "SpecialTokens":
        """The tokenizer's ids first (what the text was made with, and what lm-eval's ``hf`` model
        uses), the checkpoint's recorded ids where the tokenizer has none."""
        def pick(tokenizer_id: Optional[int], role: str) -> Optional[int]:
            return tokenizer_id if tokenizer_id is not None else recorded.get(role)

        bos = pick(getattr(tokenizer, "bos_token_id", None), "bos")
        eos = pick(getattr(tokenizer, "eos_token_id", None), "eos")
        pad = next(t for t in (pick(getattr(tokenizer, "pad_token_id", None), "pad"), eos, 0) if t is not None)
        return cls(bos, eos, pad)

    def prefix(self, which: str = "bos") -> int:
        """Id conditioning a document's first token: BOS (EOS when there is none) or EOS (EOD)."""
        ids = (self.bos, self.eos) if which == "bos" else (self.eos, self.bos)
        for i in ids:
            if i is not None:
                return i
        raise UserError("the tokenizer has neither a BOS nor an EOS token to condition the first token on")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    """``BloomForCausalLM`` in eval mode."""
    config: ModelConfig
    tokenizer_dir: Optional[str]
    """The tokenizer folder: the one asked for, else the checkpoint's own files, if it has them."""
    special_tokens: Dict[str, Optional[int]] = field(default_factory=dict)
    """bos/eos/pad ids the checkpoint records (transformers config.json or a conversion record)."""
    tokenizer: Any = None
    """``data.tokenizer.Tokenizer`` when loaded with ``with_tokenizer``."""
    ids: Optional[SpecialTokens] = None
    """Resolved special ids (see the module docstring) when loaded with ``with_tokenizer``."""
    device: torch.device = torch.device("cpu")
    """Where ``model`` lives (``resolve_device``'s answer for the device asked for)."""


def load_model(
    path: str,
    dtype=None,
    attention_impl: Optional[str] = None,
    tokenizer: Optional[str] = None,
    with_tokenizer: bool = False,
    device: Optional[str | torch.device] = None,
) -> LoadedModel:
    """Load a native checkpoint or a transformers folder into one process, on ``device`` (default cpu).

    With ``with_tokenizer`` (implied by ``tokenizer``) the tokenizer is loaded too: the
    ``tokenizer`` folder, else the checkpoint's own files (a transformers folder's, a native
    checkpoint's ``tokenizer/``). The device and a given tokenizer folder are checked before any
    weight is read.
    """
    from megatron_bloom.checkpoint.files import TOKENIZER_DIR, has_tokenizer_files, tokenizer_files
    from megatron_bloom.checkpoint.native import checkpoint_special_tokens, iter_native_checkpoint, model_from_layers

    dev = resolve_device(device)  # a wrong --device fails before the model is read
    if tokenizer:
        tokenizer_files(tokenizer)  # so does a wrong --tokenizer
    if not os.path.isdir(path):
        raise UserError(f"--load {path} does not exist")
    if os.path.isfile(os.path.join(path, "config.json")):
        from megatron_bloom.checkpoint.hf import iter_hf_checkpoint, special_tokens_from_hf

        cfg, layers = iter_hf_checkpoint(path)
        with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
            special = special_tokens_from_hf(json.load(fh))
        tokenizer_dir = path if has_tokenizer_files(path) else None
    else:
        cfg, layers = iter_native_checkpoint(path)
        special = checkpoint_special_tokens(path)
        candidate = os.path.join(path, TOKENIZER_DIR)
        tokenizer_dir = candidate if os.path.isdir(candidate) and has_tokenizer_files(candidate) else None
    # Filled one layer at a time: memory holds the model and one layer, not a merged copy besides.
    model = model_from_layers(cfg, layers, dtype, attention_impl).to(dev)
    loaded = LoadedModel(model, cfg, tokenizer or tokenizer_dir, special, device=dev)
    if tokenizer or with_tokenizer:
        if loaded.tokenizer_dir is None:
            raise UserError(f"{path} has no tokenizer files; pass the tokenizer folder "
                            f"(--tokenizer DIR, or tokenizer=DIR in lm-eval's model_args)")
        from megatron_bloom.data.tokenizer import load_tokenizer

        loaded.tokenizer = load_tokenizer(loaded.tokenizer_dir)
        loaded.ids = SpecialTokens.resolve(loaded.tokenizer, special)
    return loaded


@torch.no_grad()
def prompt_logprobs(model, ids: Sequence[int]) -> List[float]:
    """``[log p(ids[i+1] | ids[:i+1]) for i in range(len(ids) - 1)]`` in float32, on the model's device."""
    if len(ids) < 2:
        return []
    tokens = torch.tensor([list(ids)], dtype=torch.long, device=model_device(model))  # [1, s]
    logits = model(tokens)[0, :-1].float()  # [s-1, v]
    logp = logits.log_softmax(-1)  # padded rows hold finfo.min: exp() is 0, the normaliser is unchanged
    return logp.gather(-1, tokens[0, 1:, None]).squeeze(-1).tolist()


def _next_tokens(
    logits: Tensor, vocab_size: int, temperature: float, top_p: float, generator: Optional[torch.Generator]
) -> Tensor:
    """``[b, v]`` logits -> ``[b]`` token ids: argmax when ``temperature <= 0``, else top-p sampling
    drawn from ``generator`` (on the logits' device; ``None`` is that device's default stream)."""
    logits = logits.float().clone()
    logits[:, vocab_size:] = float("-inf")  # padded rows
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)  # [b, v]
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # [b, v]
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each one
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the top token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    eos_token_id: Optional[int] = None,
    pad_token_id: int = 0,
) -> List[List[int]]:
    """New token ids for each prompt (EOS included when reached): ``decode`` after checking the
    prompts and ``top_p``. ``temperature <= 0`` is greedy; ``seed`` fixes a sample (per device type)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token")
    if not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    vocab_size = model.config.vocab_size
    for p in prompts:
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the model's vocabulary of {vocab_size}")
    return decode(model, prompts, max_new_tokens, eos_token_id, pad_token_id, temperature, top_p, seed)


@torch.no_grad()
def decode(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_id: Optional[int],
    pad_token_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    is_done: Optional[Callable[[int, List[int]], bool]] = None,
) -> List[List[int]]:
    """New tokens per prompt: at most ``max_new_tokens``, ending at EOS (kept) or when
    ``is_done(row, new_tokens)`` is true (lm-eval's ``until`` strings); the batch stops when every
    row has. Prompts are left-padded with ``pad_token_id`` and masked. Greedy when
    ``temperature <= 0``; a sample with ``seed`` draws from a generator of the model's device
    seeded with it, without ``seed`` from that device's default stream.

    Ids, mask and generator are made on the model's device (never made elsewhere and moved), so
    the KV cache the model returns stays there; only the sampled ids come back, once per step."""
    device = model_device(model)
    b = len(prompts)
    outputs: List[List[int]] = [[] for _ in range(b)]
    if b == 0 or max_new_tokens <= 0:
        return outputs
    if any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_token_id] * (longest - len(p)) + list(p) for p in prompts],
                             dtype=torch.long, device=device)  # [b, s], left-padded
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts],
                        dtype=torch.long, device=device)  # [b, s]
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    use_mask = any(len(p) < longest for p in prompts)  # without padding the mask-free causal path is the same
    vocab_size = model.config.vocab_size
    done = [False] * b
    logits, cache = model(input_ids, attention_mask=mask if use_mask else None, use_cache=True)  # [b, s, v]
    for step in range(max_new_tokens):
        tokens = _next_tokens(logits[:, -1], vocab_size, temperature, top_p, generator).tolist()  # b ids, one copy
        for i in range(b):
            if done[i]:
                continue
            token = tokens[i]
            outputs[i].append(token)
            done[i] = (eos_token_id is not None and token == eos_token_id) or (
                is_done is not None and is_done(i, outputs[i]))
        if all(done) or step == max_new_tokens - 1:
            break
        feed = torch.tensor([pad_token_id if d else t for d, t in zip(done, tokens)], device=device)  # [b]
        if use_mask:
            mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long, device=device)], dim=1)  # [b, past + 1]
        logits, cache = model(feed[:, None], attention_mask=mask if use_mask else None,
                              past_key_values=cache, use_cache=True)  # [b, 1, v]
    return outputs
