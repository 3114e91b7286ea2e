"""Convert BLOOM checkpoints between transformers folders, our native layout and Megatron-DeepSpeed's.

    python launch/convert_checkpoint.py hf-to-native --hf HF_DIR --out CKPT [--tp 2] [--pp 2] [--dtype bf16]
    python launch/convert_checkpoint.py native-to-hf --load CKPT --out HF_DIR [--tokenizer TOK] [--dtype fp16]
    python launch/convert_checkpoint.py megatron-deepspeed-to-hf --load MDS_DIR --out HF_DIR [--num-attention-heads N]
    python launch/convert_checkpoint.py megatron-deepspeed-to-native --load MDS_DIR --out CKPT --tp 4

A native checkpoint written here is weights-only: ``--load CKPT`` in launch/pretrain.py starts
training from these weights with a fresh optimizer, at any TP/PP. Exported transformers folders
hold exactly ``vocab_size`` embedding rows (rows padded for TP divisibility are dropped).
Tokenizer files travel along: from ``--tokenizer``, else from the source (a transformers folder's
own files, a native checkpoint's ``tokenizer/``); the last line says whether one was written.
Every conversion streams: one layer is read, converted and written before the next, so memory
holds about the largest layer (the embedding) and one output shard, not the model.
Errors print one ``error:`` line, exit code 2.
"""
from __future__ import annotations

import argparse
import os
import re

from megatron_bloom.cli import entry_point
from megatron_bloom.errors import ArgumentParser, UserError


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m:
        raise UserError(f"--max-shard-size '{text}': use a number of bytes or e.g. 500MB, 5GB")
    unit = m.group(2).rstrip("B").rstrip("I")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit])


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="convert_checkpoint.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    def common(p, native_out: bool):
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                       help="cast the weights (default: keep the stored dtype)")
        p.add_argument("--tokenizer", default=None, help="tokenizer folder whose files are copied along")
        if native_out:
            p.add_argument("--tp", type=int, default=1,
                           help="tensor-parallel size of the layer files (default 1; training reshards to any TP)")
            p.add_argument("--pp", type=int, default=None, help="pipeline size recorded in the config (files do not depend on it)")
            p.add_argument("--iteration", type=int, default=0, help="iteration of the tag global_stepN")
        else:
            p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (e.g. 500MB, 5GB)")

    p = sub.add_parser("hf-to-native", help="transformers folder -> weights-only native checkpoint")
    p.add_argument("--hf", required=True, help="transformers BLOOM folder")
    common(p, native_out=True)
    p = sub.add_parser("native-to-hf", help="native checkpoint (any TP/PP) -> transformers folder")
    p.add_argument("--load", required=True, help="native checkpoint directory or its global_stepN folder")
    common(p, native_out=False)
    for name, native_out in (("megatron-deepspeed-to-hf", False), ("megatron-deepspeed-to-native", True)):
        p = sub.add_parser(name, help="original Megatron-DeepSpeed BLOOM checkpoint -> " + ("native" if native_out else "transformers"))
        p.add_argument("--load", required=True, help="checkpoint directory or its global_stepN folder")
        p.add_argument("--num-attention-heads", type=int, default=None, help="when the checkpoint's args are unreadable")
        p.add_argument("--layer-norm-epsilon", type=float, default=None, help="when the checkpoint's args are unreadable")
        common(p, native_out)
    return parser


def _tokenizer_note(tokenizer) -> str:
    return f"tokenizer from {tokenizer}" if tokenizer else "NO tokenizer (the source has none)"


def convert(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_bloom.checkpoint import files, hf, native
    from megatron_bloom.config.validate import output_dir_problem

    # Cheap checks before any weight is read (minutes for a large model).
    if args.tokenizer:
        files.tokenizer_files(args.tokenizer)
    if output_dir_problem(args.out):
        raise UserError(f"--out {args.out} cannot be created: {output_dir_problem(args.out)}; choose a writable folder")
    special = {}
    tokenizer = args.tokenizer
    if args.command == "hf-to-native":
        cfg, layers = hf.iter_hf_checkpoint(args.hf)
        special = hf.special_tokens_from_hf(hf.read_config_json(args.hf))
        tokenizer = tokenizer or files.first_tokenizer_folder([args.hf])
    elif args.command == "native-to-hf":
        cfg, layers = native.iter_native_checkpoint(args.load)
        special = native.checkpoint_special_tokens(args.load)
        tokenizer = tokenizer or files.first_tokenizer_folder([os.path.join(args.load, native.TOKENIZER_DIR)])
    else:
        from megatron_bloom.checkpoint.megatron_deepspeed import iter_megatron_deepspeed_checkpoint

        cfg, layers, _ = iter_megatron_deepspeed_checkpoint(args.load, args.num_attention_heads, args.layer_norm_epsilon)

    if args.command.endswith("-to-native"):
        path = native.write_native_checkpoint(layers, cfg, args.out, args.tp, iteration=args.iteration, dtype=args.dtype,
                                              pp=args.pp, tokenizer_dir=tokenizer, special_tokens=special)
        print(f"wrote {path}: TP={args.tp}, {cfg.num_layers} blocks, {cfg.vocab_size} vocabulary rows "
              f"padded to {cfg.padded_vocab_size(args.tp)}, weights only, " + _tokenizer_note(tokenizer))
    else:
        hf.write_hf_checkpoint(layers, cfg, args.out, dtype=args.dtype, tokenizer_dir=tokenizer, special_tokens=special,
                               max_shard_bytes=parse_size(args.max_shard_size))
        print(f"wrote {args.out}: {cfg.num_layers} blocks, {cfg.vocab_size} vocabulary rows, " + _tokenizer_note(tokenizer)
              + ("" if tokenizer else "; AutoTokenizer cannot load this folder: pass --tokenizer DIR to add one"))
    return 0


def main(argv=None) -> None:
    """``launch/convert_checkpoint.py`` and ``megatron-bloom-convert-checkpoint``: one ``error:`` line, exit 2."""
    entry_point(convert)(argv)
