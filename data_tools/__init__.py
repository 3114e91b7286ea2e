"""Tools that make, preprocess and inspect training data; each module with a ``main`` is a command
(``python data_tools/<tool>.py`` or the console script ``megatron-bloom-<tool>``)."""
from __future__ import annotations

from typing import Callable, NoReturn, Optional, Sequence


def run_tool(command: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None) -> NoReturn:
    """``errors.run_main`` for a data tool: the data layer's own input errors (a bad file, tokenizer
    or dataset) end as one ``error:`` line with exit code 2, like every ``UserError``."""
    from megatron_bloom.data.indexed_dataset import IndexedDatasetError
    from megatron_bloom.data.readers import InputError
    from megatron_bloom.data.tokenizer import TokenizerLoadError
    from megatron_bloom.errors import UserError, run_main

    def checked() -> Optional[int]:
        try:
            return command(argv)
        except (InputError, TokenizerLoadError, IndexedDatasetError) as exc:
            raise UserError(str(exc)) from None

    run_main(checked)
