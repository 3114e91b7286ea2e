#!/usr/bin/env python
"""Generate text from a native checkpoint (any TP/PP) or a transformers BLOOM folder, on one process.

    python launch/generate.py --load CKPT --prompt "The capital of France is" --max-new-tokens 20
    python launch/generate.py --load HF_DIR --prompt "Once" --temperature 0.8 --top-p 0.9 --seed 1 --json

Greedy unless ``--temperature`` > 0; ``--json`` prints one JSON line per prompt. Details in
megatron_bloom/commands/generate.py (``--help``).
"""
from megatron_bloom.commands.generate import main

if __name__ == "__main__":
    main()
