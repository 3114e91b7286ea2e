"""Run a DeepSpeed checkpoint tool on files from anywhere: weights-only, with Megatron's names.

DeepSpeed's tools (``ds_to_universal``, which resume at another layout runs this way) read engine
and optimizer files with ``torch.load(weights_only=False)``, which would run any code a file holds.
Here every load of the tool and of its worker processes is forced weights-only with the allow-list
of ``trust.py`` (Megatron-DeepSpeed's args and enums, DeepSpeed's loss scalers and ZeRO classes),
and ``megatron.enums`` resolves (engine files name it) without Megatron installed. The folder given
as ``--input_folder`` is checked file by file first, so a refused file is one ``error:`` line::

    python -m megatron_bloom.checkpoint.run_with_megatron_enums -m deepspeed.checkpoint.ds_to_universal ...
    python -m megatron_bloom.checkpoint.run_with_megatron_enums some_tool.py ARGS ...

Nothing is registered for the enums when a real Megatron is importable.
"""
from __future__ import annotations

import os
import runpy
import sys

from megatron_bloom.checkpoint.megatron_args import megatron_enums_importable
from megatron_bloom.checkpoint.trust import check_checkpoint_folder, deepspeed_loading
from megatron_bloom.errors import UserError, fail


def _input_folder(argv: list) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--input_folder" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--input_folder="):
            return arg.split("=", 1)[1]
    return None


def main(argv: list) -> None:
    if not argv or argv[0] in ("-h", "--help") or (argv[0] == "-m" and len(argv) < 2):
        print(__doc__.strip(), file=sys.stderr)
        raise SystemExit(2)
    folder = _input_folder(argv)
    if folder and os.path.isdir(folder):
        try:
            check_checkpoint_folder(folder)
        except UserError as exc:
            fail(str(exc))
    with deepspeed_loading(), megatron_enums_importable():
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
