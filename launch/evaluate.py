#!/usr/bin/env python
"""Perplexity / byte-perplexity or zero-shot multiple choice of a checkpoint on a jsonl file.

    python launch/evaluate.py --load CKPT --data docs.jsonl [--metric ppl,byte_ppl] [--max-length N]
                              [--stride S] [--batch-size B] [--json] [--tensorboard-dir DIR]
    python launch/evaluate.py --load CKPT --data choices.jsonl --task mc [--json]

See ``megatron_bloom/evaluation/cli.py`` (``--help``) for every flag and the conventions.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_bloom.cli import entry_point  # noqa: E402
from megatron_bloom.evaluation.cli import main  # noqa: E402

if __name__ == "__main__":
    entry_point(main)()
