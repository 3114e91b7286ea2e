#!/usr/bin/env python
"""Convert BLOOM checkpoints between transformers folders, our native layout and Megatron-DeepSpeed's.

    python launch/convert_checkpoint.py hf-to-native --hf HF_DIR --out CKPT --tp 2 [--pp 2] [--dtype bf16]
    python launch/convert_checkpoint.py native-to-hf --load CKPT --out HF_DIR [--tokenizer TOK] [--dtype fp16]
    python launch/convert_checkpoint.py megatron-deepspeed-to-hf --load MDS_DIR --out HF_DIR [--num-attention-heads N]
    python launch/convert_checkpoint.py megatron-deepspeed-to-native --load MDS_DIR --out CKPT --tp 4

A native checkpoint written here is weights-only (``--load`` in launch/pretrain.py starts from it with
a fresh optimizer). Details in megatron_bloom/commands/convert_checkpoint.py (``--help``).
"""
from megatron_bloom.commands.convert_checkpoint import main

if __name__ == "__main__":
    main()
