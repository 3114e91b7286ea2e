#!/usr/bin/env python
"""Perplexity / byte-perplexity or zero-shot multiple choice of a checkpoint on a jsonl file.

    python launch/evaluate.py --load CKPT --data docs.jsonl [--metric ppl,byte_ppl] [--max-length N]
                              [--stride S] [--batch-size B] [--json] [--tensorboard-dir DIR]
    python launch/evaluate.py --load CKPT --data choices.jsonl --task mc [--json]

See ``megatron_bloom/evaluation/cli.py`` (``--help``) for every flag and the conventions.
"""
from megatron_bloom.evaluation.cli import console_main as main

if __name__ == "__main__":
    main()
