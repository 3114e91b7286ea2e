#!/usr/bin/env python
"""`make demo`: pretrain a tiny BLOOM, finetune it BLOOMZ-style, and show what finetuning changed.

    python launch/demo.py [--out demo_out] [--pretrain-iters 400] [--finetune-iters 200]

Seven stages (data, tokenizer, preprocess, pretrain at TP=2 x PP=2 with configs/demo.yaml, export,
finetune at DP=2 with configs/demo-finetune.yaml, evaluate), each printed as the command a user would
type; the stages are described in megatron_bloom/commands/demo.py.
"""
from megatron_bloom.commands.demo import main

if __name__ == "__main__":
    main()
