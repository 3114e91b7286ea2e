"""Generate text from a native checkpoint (any TP/PP) or a transformers BLOOM folder, on one process.

    python launch/generate.py --load CKPT --prompt "The capital of France is" --max-new-tokens 20
    python launch/generate.py --load HF_DIR --prompt "Once" --temperature 0.8 --top-p 0.9 --seed 1 --json
    python launch/generate.py --load CKPT --prompt "Once" --device cuda --dtype bf16

Greedy unless ``--temperature`` > 0. ``--prompt`` may be repeated: the prompts run as one batch
(left-padded). The tokenizer comes from ``--tokenizer``, else from the checkpoint (a transformers
folder's own files, a native checkpoint's ``tokenizer/``). Prints each continuation; with
``--json`` each prompt instead gives one JSON line
``{"prompt_ids", "generated_ids", "prompt_logprobs", "text"}`` (the last line for one prompt), where
``prompt_logprobs[i] = log p(prompt_ids[i+1] | prompt_ids[:i+1])``.

``--device`` (default cpu) is where the model is loaded and everything runs: prompt ids, masks, the
KV cache and the sampling generator (see ``megatron_bloom/generation.py``). A device this machine
cannot use is refused in one ``error:`` line before any weight is read. A ``--seed`` fixes the
sample on one device type; CPU and GPU draw from different random streams.
"""
from __future__ import annotations

import argparse
import json

from megatron_bloom.cli import entry_point
from megatron_bloom.errors import ArgumentParser, UserError
from megatron_bloom.generation import DEVICE_HELP


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="generate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="native checkpoint directory or transformers folder")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    p.add_argument("--temperature", type=float, default=0.0, help="> 0 samples with this temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the checkpoint's own)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="run in this dtype (default: stored)")
    p.add_argument("--attention-impl", choices=["sdpa", "eager"], default=None, help="attention kernel")
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    return p


def generate_command(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.greedy and args.temperature > 0:
        raise UserError("--greedy and --temperature > 0 contradict each other")
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    import torch

    from megatron_bloom.distributed.init import flush_denormals
    from megatron_bloom.generation import load_model

    flush_denormals()  # before the model's first parallel op: ALiBi scores underflow (see init.py)

    # Tokenizer and special ids as generation.py's docstring orders them.
    loaded = load_model(args.load, dtype=args.dtype, attention_impl=args.attention_impl, tokenizer=args.tokenizer,
                        with_tokenizer=True, device=args.device)
    tokenizer, special = loaded.tokenizer, loaded.ids
    # An empty prompt is conditioned on the prefix token alone.
    prompt_ids = [tokenizer.encode(text) or [special.prefix()] for text in args.prompt]

    with torch.no_grad():
        return _print_generations(args, loaded, tokenizer, prompt_ids, special.eos, special.pad)


def _print_generations(args, loaded, tokenizer, prompt_ids, eos, pad) -> int:
    from megatron_bloom.generation import generate, prompt_logprobs

    new_ids = generate(loaded.model, prompt_ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_p=args.top_p, seed=args.seed, eos_token_id=eos, pad_token_id=pad)
    for ids, new in zip(prompt_ids, new_ids):
        text = tokenizer.decode(new, skip_special_tokens=True)
        if args.json:
            record = {"prompt_ids": ids, "generated_ids": new,
                      "prompt_logprobs": prompt_logprobs(loaded.model, ids), "text": text}
            print(json.dumps(record, ensure_ascii=False), flush=True)
        else:
            print(text, flush=True)
    return 0


def main(argv=None) -> None:
    """``launch/generate.py`` and ``megatron-bloom-generate``: one ``error:`` line and exit 2 on bad input."""
    entry_point(generate_command)(argv)
