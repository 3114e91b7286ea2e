"""The commands behind ``launch/*.py`` and the ``megatron-bloom-<command>`` console scripts.

Each module's ``main(argv=None)`` is the entry point: it parses the flags, runs the command and ends
the process, reporting bad input as one ``error:`` line with exit code 2 (``megatron_bloom.errors``).
``pretrain`` lives in ``megatron_bloom.cli`` and ``evaluate`` in ``megatron_bloom.evaluation.cli``.
"""
