#!/usr/bin/env python
"""Plan a BLOOM layout before asking for nodes: parameters, memory per GPU, bubble, traffic, speed.

    python launch/plan.py --model bloom-176b --nodes 48 --gpus-per-node 8 --gpu a100-80g \
        --tp 4 --pp 12 --micro-batch-size 2 --global-batch-size 2048 --zero-stage 1 --checkpoint-activations
    python launch/plan.py --model bloom-176b --nodes 48 --gpus-per-node 8 --global-batch-size 2048 --search
    python launch/plan.py --published bloom-176b            # BigScience's own layout

Exit code 0 when the layout fits, 2 with one ``error:`` line when it does not; every flag and
assumption is in megatron_bloom/commands/plan.py (``--help``).
"""
from megatron_bloom.commands.plan import main

if __name__ == "__main__":
    main()
