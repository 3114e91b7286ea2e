"""Train a byte-level BPE tokenizer built like BLOOM's and save it as a transformers folder.

Like bigscience/bloom's tokenizer: no normalization; BLOOM's pre-tokenizer (its word-splitting
regex, then ByteLevel without a prefix space or a second regex); the ByteLevel decoder; and the
special tokens <unk> <s> </s> <pad> at ids 0-3. The output
folder (tokenizer.json, tokenizer_config.json, special_tokens_map.json) loads with
`transformers.AutoTokenizer.from_pretrained(DIR)` and with `--tokenizer-name-or-path DIR`.

    python data_tools/train_tokenizer.py --input corpus.jsonl --vocab-size 1000 --output-dir tok/
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from data_tools import run_tool
from megatron_bloom.data.readers import InputError, iter_texts
from megatron_bloom.data.tokenizer import DEFAULT_SPECIAL_TOKENS

# Order fixes the ids: BLOOM has <unk>=0, <s>=1, </s>=2, <pad>=3.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
MIN_VOCAB = len(SPECIAL_TOKENS) + 256  # every byte must have a token, so nothing maps to <unk>
# bigscience/bloom's tokenizer.json splits words with this pattern (an optional leading space, then
# anything up to whitespace or sentence punctuation in several scripts), not with GPT-2's regex.
BLOOM_SPLIT_PATTERN = " ?[^(\\s|[.,!?…。，、।۔،])]+"


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(BLOOM_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # Only fixes offsets for byte-level pieces; adds no BOS/EOS (BLOOM adds none either).
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def train(inputs: list[str], vocab_size: int, key: str = "text", sample_mb: float | None = None) -> Tokenizer:
    if vocab_size < MIN_VOCAB:
        raise InputError(f"--vocab-size {vocab_size} is below {MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special tokens); use at least {MIN_VOCAB}")
    tok = build_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    limit = None if sample_mb is None else int(sample_mb * 1_000_000 / max(1, len(inputs)))

    def texts():
        for path in inputs:
            yield from iter_texts(path, key, limit_bytes=limit)

    tok.train_from_iterator(texts(), trainer=trainer)
    return tok


def save(tok: Tokenizer, output_dir: str, model_max_length: int = 2048) -> None:
    os.makedirs(output_dir, exist_ok=True)
    tok.save(os.path.join(output_dir, "tokenizer.json"))
    special = dict(DEFAULT_SPECIAL_TOKENS)
    config = {
        # The class name BLOOM's hub folder uses: older transformers load BloomTokenizerFast, newer
        # ones map it to their generic tokenizers-backed class; both read tokenizer.json as is.
        "tokenizer_class": "BloomTokenizerFast",
        **special,
        "add_prefix_space": False,
        "model_max_length": model_max_length,
        "padding_side": "left",  # as BLOOM: generation batches pad on the left
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(output_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    with open(os.path.join(output_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2, ensure_ascii=False)


def train_command(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="jsonl, jsonl.gz, parquet files or save_to_disk folders")
    parser.add_argument("--vocab-size", type=int, required=True, help=f"total vocabulary incl. special tokens (>= {MIN_VOCAB})")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--json-key", default="text", help="field holding the text")
    parser.add_argument("--sample-mb", type=float, default=None, help="train on at most this many MB of text (split over the inputs)")
    parser.add_argument("--model-max-length", type=int, default=2048)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    tok = train(args.input, args.vocab_size, args.json_key, args.sample_mb)
    save(tok, args.output_dir, args.model_max_length)
    print(
        f"trained {tok.get_vocab_size()}-token byte-level BPE in {time.perf_counter() - start:.1f}s -> {args.output_dir}",
        file=sys.stderr,
    )
    return 0


def main(argv=None) -> None:
    """``python data_tools/train_tokenizer.py`` and ``megatron-bloom-train-tokenizer``."""
    run_tool(train_command, argv)


if __name__ == "__main__":
    main()
