"""TensorBoard event files with Megatron-DeepSpeed's tag names.

A tag ending in `` vs samples`` is written with step = consumed samples, `` vs tokens`` with step
= consumed tokens, every other tag with step = iteration (see ``axis_of``) (Megatron's convention: the x axis is in
the tag's name, so BLOOM's published TensorBoards and ours overlay tag by tag).
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

VS_SAMPLES = " vs samples"
VS_TOKENS = " vs tokens"


def axis_of(tag: str) -> str:
    """'samples', 'tokens' or 'iteration': what Megatron plots ``tag`` against.

    `` vs samples`` / `` vs tokens`` suffixes, and Megatron's conversion curves
    ``steps-vs-samples/y=steps,x=samples`` and ``steps-vs-tokens/y=steps,x=tokens``.
    """
    if tag.endswith(VS_SAMPLES) or tag.endswith(",x=samples"):
        return "samples"
    if tag.endswith(VS_TOKENS) or tag.endswith(",x=tokens"):
        return "tokens"
    return "iteration"


def step_for(tag: str, iteration: int, samples: Optional[int], tokens: Optional[int]) -> int:
    """The x value of ``tag`` (see ``axis_of``)."""
    axis = axis_of(tag)
    if axis == "iteration":
        return iteration
    step = samples if axis == "samples" else tokens
    if step is None:
        raise ValueError(f"'{tag}' is plotted against consumed {axis}, which were not given")
    return step


class TensorBoardWriter:
    """``torch.utils.tensorboard.SummaryWriter`` in ``log_dir`` (create it on the logging rank only)."""

    def __init__(self, log_dir: str, max_queue: int = 1000, flush_secs: int = 30):
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(log_dir, exist_ok=True)
        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=log_dir, max_queue=max_queue, flush_secs=flush_secs)

    def log(self, values: Mapping[str, float], iteration: int, samples: Optional[int] = None,
            tokens: Optional[int] = None) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step_for(tag, iteration, samples, tokens))

    def add_text(self, tag: str, markdown: str, iteration: int = 0) -> None:
        self.writer.add_text(tag, markdown, iteration)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
