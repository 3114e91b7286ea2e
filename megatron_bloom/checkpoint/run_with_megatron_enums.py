"""Run a tool that unpickles engine files in full with Megatron's enums importable.

Engine files (``mp_rank_XX_model_states.pt``) hold Megatron-DeepSpeed's args, whose enums pickle
as ``megatron.enums.*`` (see ``megatron_args.py``). A tool that loads them with
``torch.load(weights_only=False)`` (DeepSpeed's ``ds_to_universal``, which resume at another
layout runs this way) needs that module, as it does for Megatron-DeepSpeed's own files::

    python -m megatron_bloom.checkpoint.run_with_megatron_enums -m deepspeed.checkpoint.ds_to_universal ...
    python -m megatron_bloom.checkpoint.run_with_megatron_enums some_tool.py ARGS ...

Nothing is registered when a real Megatron is importable.
"""
from __future__ import annotations

import runpy
import sys

from megatron_bloom.checkpoint.megatron_args import megatron_enums_importable


def main(argv: list) -> None:
    if not argv or argv[0] in ("-h", "--help") or (argv[0] == "-m" and len(argv) < 2):
        print(__doc__.strip(), file=sys.stderr)
        raise SystemExit(2)
    with megatron_enums_importable():
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
