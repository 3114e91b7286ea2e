#!/usr/bin/env python
"""Finetune BLOOM on packed prompt/answer pairs (xP3 / BLOOMZ style) with TP x PP x DP.

    torchrun --nproc-per-node 4 launch/finetune.py --config configs/finetune-tp2-pp2.yaml \
        --pretrained PRETRAINED --data-path data/xp3 --save ckpt --load ckpt

Takes the pretraining flags plus ``--pretrained`` (a native checkpoint or a transformers folder);
BLOOMZ's defaults are listed in megatron_bloom/commands/finetune.py.
"""
from megatron_bloom.commands.finetune import main

if __name__ == "__main__":
    main()
