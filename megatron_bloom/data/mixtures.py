"""The --train/--valid-weighted-split-paths mixtures of a run, given inline or in a mixture file."""
from __future__ import annotations

from typing import List, Optional, Tuple

from megatron_bloom.config.schema import RunConfig
from megatron_bloom.errors import UserError


def weighted_split_paths(cfg: RunConfig) -> Tuple[Optional[List[str]], Optional[List[str]]]:
    """(train groups, validation groups) from the flags or from the mixture files their *_path flags name."""
    from megatron_bloom.data.xp3 import read_weighted_split_paths_file

    d = cfg.data
    out = []
    for kind in ("train", "valid"):
        inline = getattr(d, f"{kind}_weighted_split_paths")
        path = getattr(d, f"{kind}_weighted_split_paths_path")
        if inline and path:
            raise UserError(f"--{kind}-weighted-split-paths and --{kind}-weighted-split-paths-path are both given; keep one")
        if path:
            try:
                inline = read_weighted_split_paths_file(path, f"--{kind}-weighted-split-paths-path")
            except ValueError as exc:
                raise UserError(str(exc)) from None
        out.append(inline)
    return out[0], out[1]
