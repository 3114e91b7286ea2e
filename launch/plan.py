#!/usr/bin/env python
"""Plan a training command before asking for nodes: parameters, memory per GPU, bubble, traffic, speed.

    python launch/plan.py --nodes 48 --gpus-per-node 8 --gpu a100-80g --model-name bloom-176b \
        --tensor-model-parallel-size 4 --pipeline-model-parallel-size 12 --micro-batch-size 2 \
        --global-batch-size 2048 --bf16 --zero-stage 0 --checkpoint-activations
    python launch/plan.py --nodes 8 --gpus-per-node 8 --model-name bloom-7b1 --global-batch-size 512 --fp16 --search
    python launch/plan.py --published bloom-176b            # BigScience's own layout

Takes the trainer's own flags (launch/pretrain.py's, or launch/finetune.py's with --finetune) plus
the cluster; exit code 0 when the command fits, 2 with one ``error:`` line when it does not. Every
flag and assumption is in megatron_bloom/commands/plan.py (``--help``).
"""
from megatron_bloom.commands.plan import main

if __name__ == "__main__":
    main()
